//! The `ensemble.v1` protocol shared by the model node and the coordinator.
//!
//! # Layout
//! - `proto/ensemble/v1/node.proto`: the `ModelNode` service (source of truth, documented field by field).
//! - `proto/ensemble/v1/ensemble.proto`: the coordinator's `Ensemble` service.
//! - [`v1`]: the generated messages, client and server (code generation by `protox`, no system `protoc`).
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC server reflection.

/// Generated code for package `ensemble.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("ensemble.v1");
}

/// Encoded `FileDescriptorSet` of every file in the package, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ensemble_descriptor.bin"));
