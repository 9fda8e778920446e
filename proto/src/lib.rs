//! The `ensemble.v1` protocol shared by the model node and the coordinator.
//!
//! # Layout
//! - `proto/ensemble/v1/node.proto`: the `ModelNode` service (source of truth, documented field by field).
//! - `proto/ensemble/v1/ensemble.proto`: the coordinator's `Ensemble` service.
//! - [`v1`]: the generated messages, client and server (code generation by `protox`, no system `protoc`).
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC server reflection.
//! - [`reasoning`]: the `<think>…</think>` convention behind `GenerateResponse.reasoning`.

/// Generated code for package `ensemble.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("ensemble.v1");
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

    #[cfg(test)]
    mod tests {
        use super::split;

        #[test]
        fn a_leading_block_is_split_off() {
            assert_eq!(split("<think>504</think>405"), Some(("504", "405")));
            assert_eq!(split("Tarn"), None);
            assert_eq!(split("The <think> tag"), None);
            assert_eq!(split("<think>50"), Some(("50", "")));
        }
    }
}
