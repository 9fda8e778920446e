//! The coordinator: runs the ensemble strategies across model nodes.
//!
//! The strategies are synchronous state machines with no networking: the async fan-out (to come)
//! calls the model nodes in parallel, feeds their answers in, and acts on what comes back. Each
//! state machine is unit-tested on hand-computed examples.
//!
//! # Layout
//! - [`error`]: the crate's one error type, [`Error`]; each variant documents its gRPC code.
//! - [`specfuse`]: SpecFuse propose / verify rounds with model exit and optional SpecEM online
//!   weights ([`SpecFuse`], [`SpecFuseParams`], [`RoundOutcome`]).
//!   - `specfuse/drafts.rs`: word-boundary cuts, empty drafts, merging identical drafts.
//! - [`chared`]: CharED character-wise ensembling of next-character distributions ([`CharEd`],
//!   [`CharedParams`], [`CharStep`]).
//! - [`drive`]: the async edge of SpecFuse: parallel fan-out, failures, broadcast ([`drive::specfuse`]).
//! - [`node_client`]: one node within one request: session deltas, full-context resend when the
//!   node lost the session, per-call deadlines ([`NodeClient`]).
//! - [`service`]: the `Ensemble` gRPC service ([`service::Coordinator`]) and the one mapping of
//!   [`Error`] to gRPC status codes.
//! - `math.rs`: the shared, numerically stable softmax.
//! - `main.rs`: the binary, a stub until the network layer lands.
//!
//! The algorithms follow `ALGORITHMS.md`; every choice marked **ours** there is a documented option
//! with its default on the params structs.

pub mod chared;
pub mod drive;
pub mod error;
mod math;
pub mod node_client;
pub mod service;
pub mod specfuse;

pub use chared::{CharEd, CharOutcome, CharStep, CharedParams, NodeCharDist};
pub use error::{Error, Result};
pub use node_client::NodeClient;
pub use specfuse::{DraftText, Drafts, RoundOutcome, SpecFuse, SpecFuseParams};
