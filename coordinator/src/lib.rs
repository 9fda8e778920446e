//! The coordinator: runs the ensemble strategies across model nodes.
//!
//! The strategies are synchronous state machines with no networking: the async fan-out
//! calls the model nodes in parallel, feeds their answers in, and acts on what comes back. Each
//! state machine is unit-tested on hand-computed examples.
//!
//! # Layout
//! - [`error`]: the crate's one error type, [`Error`]; each variant documents its gRPC code.
//! - [`strategy`]: every ensemble strategy behind one interface ([`Strategy`], [`Step`],
//!   [`Answer`]) and its [`strategy::registry`]; each strategy's state machine, driver and options
//!   live in its own module there:
//!   - [`specfuse`]: SpecFuse propose / verify rounds with model exit and optional SpecEM online
//!     weights ([`SpecFuse`], [`SpecFuseParams`], [`RoundOutcome`]).
//!   - [`chared`]: CharED character-wise ensembling of next-character distributions ([`CharEd`],
//!     [`CharedParams`], [`CharStep`]), with speculative rounds and the confidence gate.
//!   - [`strategy::colm`]: Co-LLM learned deferral from a base member to assistants across
//!     tokenizers.
//!   - [`strategy::pipeline`]: FSLM stacked pipelines of members with role prompts and routes.
//!   - [`strategy::single`]: `single:NAME`, one member alone.
//! - [`core`]: the [`Coordinator`]: members, request checks, the run of one request through its
//!   strategy, the answer on the wire.
//! - [`node_client`]: one node within one request: session deltas, full-context resend when the
//!   node lost the session, per-call deadlines ([`NodeClient`]).
//! - [`service`]: the `Ensemble` gRPC service and the one mapping of [`Error`] to gRPC status
//!   codes.
//! - [`http`]: the HTTP face: OpenAI-compatible `/v1` API (with `http/openai.rs`, the wire format,
//!   and `http/stream.rs`, what a stream may show yet), `/metrics`, `/health`.
//! - [`metrics`]: the coordinator's Prometheus metrics.
//! - [`auth`]: bearer-token checks of clients (gRPC and HTTP), keys redacted everywhere.
//! - [`outlier`]: outlier ejection of members whose calls keep failing (skipped until a trial call
//!   succeeds).
//! - [`probe`]: the background health probe of every member, and readiness.
//! - [`replicas`]: the replicas of one member: a static address or DNS discovery (headless
//!   Services), round-robin per request, fail-over on retries.
//! - [`config`]: the TOML configuration shared by both binaries, with defaults and checks.
//! - [`evaluate`]: held-out sets, exact-match scoring and the accuracy tables of `ensemble eval`.
//! - [`perplexity`]: bits per character of a text under every member and their mixture; fitted
//!   mixture weights (`ensemble perplexity`).
//! - [`cluster`]: a local cluster (one `model-node` process per model, the coordinator in process)
//!   for `ensemble up` and `--local`.
//! - `math.rs`: the shared, numerically stable softmax.
//! - `main.rs` (`coordinator serve`) and `bin/ensemble.rs` (the CLI): thin binaries.
//!
//! The algorithms follow `ALGORITHMS.md`; every choice marked **ours** there is a documented option
//! with its default on the params structs.

pub mod auth;
pub mod cluster;
pub mod config;
pub mod core;
pub mod error;
pub mod evaluate;
pub mod http;
mod math;
pub mod metrics;
pub mod node_client;
pub mod outlier;
pub mod perplexity;
pub mod probe;
pub mod replicas;
pub mod server;
pub mod service;
pub mod strategy;

pub use strategy::{chared, specfuse};

pub use chared::{CharEd, CharOutcome, CharStep, CharedParams, NodeCharDist};
pub use core::Coordinator;
pub use error::{Error, Result};
pub use node_client::NodeClient;
pub use specfuse::{DraftText, Drafts, RoundOutcome, SpecFuse, SpecFuseParams};
pub use strategy::{Answer, Step, Strategy};
