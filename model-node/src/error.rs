//! The crate's one error type and its single mapping to `tonic::Status`.

use tonic::{Code, Status};

/// Everything that can go wrong in the node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model directory is missing a file or holds an invalid one (start-up only).
    #[error("model directory: {0}")]
    ModelDir(String),
    /// The server could not start: TLS files, listener, reflection.
    #[error("server: {0}")]
    Server(String),
    /// A tensor operation failed.
    #[error("model computation failed: {0}")]
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
    /// The engine is shutting down or has stopped.
    #[error("node is shutting down")]
    ShuttingDown,
    /// The client went away before the work ran.
    #[error("request cancelled by the client")]
    Cancelled,
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
            Error::Busy { .. } => Code::ResourceExhausted,
            Error::ShuttingDown => Code::Unavailable,
            Error::Cancelled => Code::Cancelled,
            Error::ModelDir(_) | Error::Server(_) | Error::Candle(_) | Error::Vocab(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}
