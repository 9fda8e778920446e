//! The `ensemble.v1` protocol shared by the model node and the coordinator.
//!
//! # Layout
//! - `proto/ensemble/v1/node.proto`: the `ModelNode` service (source of truth, documented field by field).
//! - `proto/ensemble/v1/ensemble.proto`: the coordinator's `Ensemble` service.
//! - [`v1`]: the generated messages, client and server (code generation by `protox`, no system `protoc`).
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC server reflection.
//! - [`reasoning`]: the `<think>…</think>` convention behind `GenerateResponse.reasoning`.
//! - [`telemetry`]: logs, OTLP trace export from the `OTEL_*` variables, W3C trace context in gRPC
//!   metadata (shared by both binaries).
//! - [`tls`]: TLS and mutual TLS for the gRPC hops, from PEM files.
//! - [`net`]: how every listener accepts connections (TCP_NODELAY on each accepted socket).
//! - [`health`]: the `grpc.health.v1` probe behind both binaries' `health` subcommand (container
//!   health checks).
//! - [`cli`]: how the binaries end (a failure in one paragraph, never a backtrace).

pub mod cli;
pub mod faults;
pub mod health;
pub mod limits;
pub mod net;
pub mod telemetry;
pub mod tls;

/// Generated code for package `ensemble.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("ensemble.v1");
}

/// A listen address that can be switched off: `HOST:PORT`, or `off` (or empty) for none. Shared by
/// the node's `--metrics-listen` and the coordinator's `http_listen`.
pub fn parse_listen(s: &str) -> Result<Option<std::net::SocketAddr>, String> {
    if s.eq_ignore_ascii_case("off") || s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|e| format!("{s:?}: expected HOST:PORT or `off` ({e})"))
}

/// The canonical upper-case name of a gRPC status code (`OK`, `INVALID_ARGUMENT`...), as used by
/// the metrics of both servers.
pub fn status_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Encoded `FileDescriptorSet` of every file in the package, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ensemble_descriptor.bin"));

/// The reasoning-block convention behind `GenerateResponse.reasoning`: models that think before they
/// answer (DeepSeek-R1, Qwen3, the bundled arithmetic models) open the answer with
/// `<think>…</think>`; the answer proper is what follows.
pub mod reasoning {
    /// Opens the block.
    pub const START: &str = "<think>";
    /// Closes it.
    pub const END: &str = "</think>";

    /// `(reasoning, answer)` of a text that opens with a reasoning block; `None` when it does not.
    /// An unclosed block (the length limit hit while thinking) is all reasoning and no answer.
    pub fn split(text: &str) -> Option<(&str, &str)> {
        let rest = text.trim_start().strip_prefix(START)?;
        Some(match rest.find(END) {
            Some(i) => (&rest[..i], &rest[i + END.len()..]),
            None => (rest, ""),
        })
    }

    /// Splits streamed text the way [`split`] splits a whole one, as the pieces arrive: a tag cut
    /// across two pieces is held back until it is whole.
    #[derive(Debug, Default)]
    pub struct StreamSplit {
        state: State,
        pending: String,
    }

    #[derive(Debug, Default, PartialEq)]
    enum State {
        #[default]
        Start,
        Reasoning,
        Answer,
    }

    impl StreamSplit {
        /// Feeds `piece`; returns the (reasoning, answer) text that is now certain.
        pub fn push(&mut self, piece: &str) -> (String, String) {
            let mut out = (String::new(), String::new());
            if self.state == State::Answer {
                out.1.push_str(piece);
                return out;
            }
            self.pending.push_str(piece);
            if self.state == State::Start {
                let t = self.pending.trim_start();
                if let Some(rest) = t.strip_prefix(START) {
                    self.pending = rest.to_owned();
                    self.state = State::Reasoning;
                } else if START.starts_with(t) {
                    return out;
                } else {
                    self.state = State::Answer;
                    out.1 = std::mem::take(&mut self.pending);
                    return out;
                }
            }
            // Reasoning: everything up to END; hold back a tail that may be END's beginning.
            if let Some(i) = self.pending.find(END) {
                out.0 = self.pending[..i].to_owned();
                out.1 = self.pending[i + END.len()..].to_owned();
                self.pending.clear();
                self.state = State::Answer;
            } else {
                let hold = (1..END.len())
                    .rev()
                    .find(|&n| self.pending.ends_with(&END[..n]))
                    .unwrap_or(0);
                let cut = self.pending.len() - hold;
                out.0 = self.pending[..cut].to_owned();
                self.pending.drain(..cut);
            }
            out
        }

        /// The text still held back, at the end of the stream.
        pub fn finish(&mut self) -> (String, String) {
            let rest = std::mem::take(&mut self.pending);
            match std::mem::replace(&mut self.state, State::Answer) {
                State::Reasoning => (rest, String::new()),
                _ => (String::new(), rest),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::{StreamSplit, split};

        fn streamed(pieces: &[&str]) -> (String, String) {
            let mut s = StreamSplit::default();
            let mut out = (String::new(), String::new());
            for p in pieces.iter().copied().chain([""]) {
                let (r, a) = if p.is_empty() { s.finish() } else { s.push(p) };
                out.0 += &r;
                out.1 += &a;
            }
            out
        }

        #[test]
        fn streamed_pieces_split_like_the_whole_text() {
            for text in [
                "<think>347+058=504</think>405",
                "Tarn",
                "<think>50",
                "  <think>a</think> b",
                "<thi",
                "</think>x",
            ] {
                let whole =
                    split(text).map_or((String::new(), text.to_owned()), |(r, a)| (r.into(), a.into()));
                let chars: Vec<String> = text.chars().map(String::from).collect();
                let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
                assert_eq!(streamed(&pieces), whole, "char by char: {text:?}");
                assert_eq!(streamed(&[text]), whole, "in one piece: {text:?}");
            }
        }

        #[test]
        fn a_leading_block_is_split_off() {
            assert_eq!(split("<think>504</think>405"), Some(("504", "405")));
            assert_eq!(split("Tarn"), None);
            assert_eq!(split("The <think> tag"), None);
            assert_eq!(split("<think>50"), Some(("50", "")));
        }
    }
}
