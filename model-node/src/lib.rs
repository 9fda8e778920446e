//! The model node: one HuggingFace-format language model served over gRPC (`ensemble.v1.ModelNode`).
//! It answers three questions about a shared context — propose the next segment, score candidate
//! segments, give the distribution of the next character — with sessions that keep KV caches between
//! calls.
//!
//! # Layout
//! - [`config`]: clap/env configuration of the `model-node` binary.
//! - [`modeldir`]: reading a model directory (config, tokenizer, template, safetensors).
//! - [`deferral`]: Co-LLM deferral heads (the file format, loading, saving).
//! - [`sidecar`]: deterministic safetensors for the files beside a checkpoint (heads, stores).
//! - [`rtd`]: RTD reference stores (the file format, the k-NN mixture; `rtd/build.rs`: building one).
//! - [`model`]: architectures and the forward pass with an external KV cache.
//! - [`vocab`]: token ↔ bytes for byte-level BPE, SentencePiece and plain vocabularies; the byte trie.
//! - [`chars`]: the next-character distribution (hypothesis sets over token paths).
//! - [`template`]: chat templates (minijinja) and the plain fallback.
//! - [`sampling`]: greedy / temperature / top-k / top-p.
//! - [`engine`]: the engine thread, its bounded queue, sessions and the three operations.
//! - [`validate`]: request validation (protobuf → typed jobs).
//! - [`service`], [`server`]: the gRPC service and the server with health, reflection, TLS and drain.
//! - [`metrics`]: the node's Prometheus metrics and its `/metrics` endpoint.
//! - [`node`]: loading a node from configuration.
//! - [`threads`]: the kernel thread count, settled once at start (no per-matmul probing).
//! - [`bench`]: the `model-node bench` tables.
//! - [`fixtures`]: tiny tokenizers of each kind, for tests and training.
//! - [`error`]: the crate's error and its mapping to gRPC status codes.

pub mod bench;
pub mod chars;
pub mod config;
pub mod deferral;
pub mod engine;
pub mod error;
pub mod fixtures;
pub mod metrics;
pub mod model;
pub mod modeldir;
pub mod node;
pub mod rtd;
pub mod sampling;
pub mod server;
pub mod service;
pub mod sidecar;
pub mod template;
pub mod threads;
pub mod train;
pub mod validate;
pub mod vocab;

pub use error::{Error, Result};
