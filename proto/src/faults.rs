//! Undecodable requests are the client's fault. tonic answers a request it cannot decode (bytes
//! that are not the message, invalid UTF-8 in a string field, a truncated body, a bad compression
//! flag) with `INTERNAL`, and one over the size limit with `OUT_OF_RANGE`; [`client_fault`], applied
//! to every response of a server as a layer, rewrites those trailers-only answers to
//! `INVALID_ARGUMENT` with a message that says what to fix. Handlers' own statuses pass unchanged.

use tonic::{Code, Status};

/// Rewrites a decoding failure's status (see the module doc); every other response is untouched.
pub fn client_fault<B>(mut resp: http::Response<B>) -> http::Response<B> {
    let headers = resp.headers_mut();
    let Some(status) = Status::from_header_map(headers) else {
        return resp;
    };
    let Some(message) = rewrite(status.code(), status.message()) else {
        return resp;
    };
    headers.remove(Status::GRPC_MESSAGE);
    headers.remove(Status::GRPC_STATUS_DETAILS);
    if Status::invalid_argument(message).add_header(headers).is_err() {
        headers.insert(Status::GRPC_STATUS, http::HeaderValue::from_static("3"));
    }
    resp.extensions_mut().remove::<Status>();
    resp
}

/// The client-facing message for a decoding failure, or `None` for any other status.
fn rewrite(code: Code, message: &str) -> Option<String> {
    let undecodable = code == Code::Internal
        && (message.starts_with("failed to decode Protobuf message")
            || message.starts_with("Unexpected EOF decoding stream")
            || message.starts_with("protocol error: received message with"));
    let too_large = code == Code::OutOfRange && message.contains("decoded message length too large");
    if undecodable {
        Some(format!(
            "the request could not be decoded as an ensemble.v1 message ({message}); check the client's \
             generated code and that every string field is valid UTF-8"
        ))
    } else if too_large {
        Some(format!(
            "the request is too large ({message}); the server's max_request_bytes sets the limit"
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(s: Status) -> http::Response<()> {
        s.into_http()
    }

    #[test]
    fn decoding_failures_become_invalid_argument_and_the_rest_pass() {
        let r = client_fault(answered(Status::internal(
            "failed to decode Protobuf message: invalid string value: data is not UTF-8 encoded",
        )));
        let s = Status::from_header_map(r.headers()).expect("a status");
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("not UTF-8"), "{}", s.message());
        let r = client_fault(answered(Status::out_of_range(
            "Error, decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes",
        )));
        let s = Status::from_header_map(r.headers()).expect("a status");
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("max_request_bytes"), "{}", s.message());
        for kept in [Status::internal("engine failed"), Status::unavailable("x")] {
            let code = kept.code();
            let r = client_fault(answered(kept));
            assert_eq!(Status::from_header_map(r.headers()).map(|s| s.code()), Some(code));
        }
        let ok = http::Response::new(());
        assert!(Status::from_header_map(client_fault(ok).headers()).is_none());
    }
}
