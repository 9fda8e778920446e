//! The crate's one error type and its single mapping to `tonic::Status`.

use tonic::{Code, Status};

/// Everything that can go wrong in the node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model directory is missing a file or holds an invalid one (start-up only).
    #[error("model directory: {0}")]
    ModelDir(String),
    /// The Co-LLM deferral head file is unreadable or does not fit the model (start-up only).
    #[error("deferral head {0}")]
    DeferralHead(String),
    /// The RTD reference store is unreadable or was built for another model (start-up only).
    #[error("RTD store {0}")]
    RtdStore(String),
    /// The server could not start: TLS files, listener, reflection.
    #[error("server: {0}")]
    Server(String),
    /// A tensor operation failed (the message never carries candle's backtrace).
    #[error("model computation failed: {}", candle_message(.0))]
    Candle(#[from] candle_core::Error),
    /// The tokenizer failed on some text.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The token vocabulary could not be mapped to bytes.
    #[error("vocabulary: {0}")]
    Vocab(#[from] crate::vocab::VocabError),
    /// The chat template failed to render.
    #[error("chat template: {0}")]
    Template(String),
    /// A request field is invalid; the message says which and why.
    #[error("{0}")]
    InvalidArgument(String),
    /// The context does not fit the model.
    #[error(
        "context too long: {tokens} tokens (prompt and answer) + {new_tokens} new tokens exceed the limit of {limit}; shorten the conversation"
    )]
    ContextTooLong {
        /// Tokens in the context.
        tokens: usize,
        /// Tokens the call would add.
        new_tokens: usize,
        /// The node's limit.
        limit: usize,
    },
    /// A delta named a session this node does not hold.
    #[error("session {0:?} is unknown to this node (evicted or node restarted): resend the full context")]
    SessionNotFound(String),
    /// A delta does not line up with the session's answer.
    #[error(
        "session {session:?} holds an answer of {have} characters but the delta starts at {got}: resend the full context"
    )]
    SessionMismatch {
        /// The session.
        session: String,
        /// Characters the node holds.
        have: usize,
        /// Characters the client assumed.
        got: u64,
    },
    /// The engine queue is full.
    #[error("node busy: {limit} requests already queued; retry with backoff or add replicas")]
    Busy {
        /// Queue capacity.
        limit: usize,
    },
    /// A proposal needs more KV-cache memory than the node's whole budget.
    #[error(
        "this request needs {need} bytes of KV cache (context + new tokens) but the node's KV-cache budget is {budget} bytes (--kv-cache-mb); shorten the context or max_new_tokens, or use a node with a larger budget"
    )]
    KvBudget {
        /// Bytes the request would need.
        need: usize,
        /// The node's budget.
        budget: usize,
    },
    /// A fault inside the node, with a message for people.
    #[error("internal error: {0}")]
    Internal(String),
    /// The engine is shutting down or has stopped.
    #[error("node is shutting down")]
    ShuttingDown,
    /// The client went away before the work ran.
    #[error("request cancelled by the client")]
    Cancelled,
}

/// A candle error as one line for people: without the backtrace candle attaches when
/// `RUST_BACKTRACE` is set, with its context and file path kept.
pub fn candle_message(e: &candle_core::Error) -> String {
    use candle_core::Error as C;
    match e {
        C::WithBacktrace { inner, .. } => candle_message(inner),
        C::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        C::WithPath { inner, path } => format!("{}: {}", path.display(), candle_message(inner)),
        other => other.to_string().lines().next().unwrap_or_default().to_owned(),
    }
}

/// Result with the crate's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = match &e {
            Error::InvalidArgument(_)
            | Error::ContextTooLong { .. }
            | Error::Tokenizer(_)
            | Error::Template(_) => Code::InvalidArgument,
            Error::SessionNotFound(_) => Code::NotFound,
            Error::SessionMismatch { .. } => Code::FailedPrecondition,
            Error::Busy { .. } | Error::KvBudget { .. } => Code::ResourceExhausted,
            Error::ShuttingDown => Code::Unavailable,
            Error::Cancelled => Code::Cancelled,
            Error::ModelDir(_)
            | Error::DeferralHead(_)
            | Error::RtdStore(_)
            | Error::Server(_)
            | Error::Candle(_)
            | Error::Vocab(_)
            | Error::Internal(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}
