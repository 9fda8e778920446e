//! The language model: configuration parsing and the forward pass with an external KV cache.
//!
//! # Layout
//! - [`config`]: `config.json` → [`ArchConfig`] for Llama, Qwen2, Mistral, Phi-3 and Gemma 2.
//! - [`transformer`]: [`Transformer`] (weights, rotary tables, forward passes).
//! - `kv`: [`KvCache`], storage preallocated per layer, appended in place, views forked freely.
//! - `matvec`: the products of a decode step (up to 32 rows) on every kernel thread, each weight read
//!   once, a row's result independent of its batch mates (AVX-512 / AVX2 kernels picked at run time).
//! - `ragged`: the CPU attention kernel of a batched step (every row over its own cache and its own
//!   sequence's new rows: decode rows and scored candidates in one pass).
//! - [`weights`]: where weights come from ([`WeightSource`]: safetensors or GGUF) and [`Linear`], a
//!   projection dense or GGML-quantized.
//! - [`gguf`]: GGUF files: llama.cpp's names and metadata read into the same forward pass, and
//!   written from a HuggingFace directory (`model-node convert`), quantized or not.

pub mod config;
pub mod gguf;
mod gguf_vocab;
mod kv;
mod matvec;
mod ragged;
pub mod transformer;
pub mod weights;

pub use config::{Arch, ArchConfig, SUPPORTED};
pub use transformer::{Chunk, KvCache, RaggedStep, Transformer};
pub use weights::{Linear, WeightSource};

/// Rows up to which a step's dense f32 products on the CPU give every row the same bits whatever
/// else is in the step (the engine merges work from several calls into one pass up to this).
pub const BATCH_INVARIANT_ROWS: usize = matvec::MAX_ROWS;
