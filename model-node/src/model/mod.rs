//! The language model: configuration parsing and the forward pass with an external KV cache.
//!
//! # Layout
//! - [`config`]: `config.json` → [`ArchConfig`] for Llama, Qwen2, Mistral, Phi-3 and Gemma 2.
//! - [`transformer`]: [`Transformer`] (weights, rotary tables, forward) and [`KvCache`].

pub mod config;
pub mod transformer;

pub use config::{Arch, ArchConfig, SUPPORTED};
pub use transformer::{KvCache, RaggedStep, Transformer};
