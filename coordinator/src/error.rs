//! The crate's one error type.
//!
//! Every variant names the gRPC status code it maps to; the mapping to `tonic::Status` lives in one
//! place, with the network layer, so that this crate stays free of networking.

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the ensemble strategies.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A parameter is outside its allowed range. Maps to `INVALID_ARGUMENT`.
    #[error("invalid parameter `{name}` = {value}: must be {allowed}")]
    InvalidParameter {
        /// The parameter's name as written in the config (`exit.delta`, `weights[2]`, ...).
        name: String,
        /// The value that was given, formatted for humans.
        value: String,
        /// The allowed range, in words (`a finite number in [0, 1]`).
        allowed: &'static str,
    },
    /// The node weights do not match the number of nodes. Maps to `INVALID_ARGUMENT`.
    #[error(
        "invalid parameter `weights`: {got} weights given for {expected} nodes; give one weight \
         per node or none (uniform)"
    )]
    WeightCount {
        /// Number of nodes in the ensemble.
        expected: usize,
        /// Number of weights given.
        got: usize,
    },
    /// A request field the client must fix. Maps to `INVALID_ARGUMENT`: the field, and what is wrong.
    #[error("{field}: {message}")]
    Invalid {
        /// The field, e.g. `colm.assistants`.
        field: String,
        /// What is wrong and what would be accepted.
        message: String,
    },
    /// An ensemble was asked for with no node at all. Maps to `INVALID_ARGUMENT`.
    #[error("an ensemble needs at least one node; none were configured")]
    NoNodes,
    /// A node index outside `0..nodes` was passed in: a bug in the caller. Maps to `INTERNAL`.
    #[error("unknown node {node}: this ensemble has nodes 0..{nodes}")]
    UnknownNode {
        /// The index that was passed.
        node: usize,
        /// Number of nodes in the ensemble.
        nodes: usize,
    },
    /// Drafts prepared for an ensemble of another size were passed in: a bug in the caller.
    /// Maps to `INTERNAL`.
    #[error("drafts were prepared for {got} nodes but this ensemble has {expected}")]
    DraftsMismatch {
        /// Number of nodes in the ensemble.
        expected: usize,
        /// Number of nodes the drafts were prepared for.
        got: usize,
    },
    /// Every node has left the request (failed or exited). Maps to `UNAVAILABLE`.
    #[error("no active node left for this request")]
    NoActiveNode,
    /// Nodes failed and the request could not go on. Maps to `UNAVAILABLE`; the message names each
    /// failed node and its cause.
    #[error("{reason}; failed nodes: {causes}")]
    NodesFailed {
        /// Why the request stopped (no active node left, no draft, ...).
        reason: String,
        /// Every failed node with its error.
        causes: String,
    },
    /// The member is ejected after failing (outlier ejection): the request goes on without it.
    /// Maps to `UNAVAILABLE`.
    #[error("node {node} is ejected after failing calls; next trial in {retry_ms} ms")]
    Ejected {
        /// The node's name.
        node: String,
        /// Milliseconds until a call may try it again.
        retry_ms: u64,
    },
    /// A model node answered with an error status. The request goes on without that node; when it is
    /// what the request ends with, it maps to the node's own code if the fault is the client's
    /// (`INVALID_ARGUMENT`, `RESOURCE_EXHAUSTED`), else to `UNAVAILABLE`.
    #[error("node {node}: {code:?}: {message}")]
    Node {
        /// The node's name.
        node: String,
        /// The gRPC code it answered.
        code: tonic::Code,
        /// Its message.
        message: String,
    },
    /// The client went away; the request stopped and freed its node sessions. Maps to `CANCELLED`.
    #[error("the client cancelled the request")]
    Cancelled,
    /// A model node did not answer within its per-call deadline. Maps to `DEADLINE_EXCEEDED`.
    #[error("node {node} did not answer within {deadline_ms} ms")]
    Timeout {
        /// The node's name.
        node: String,
        /// The deadline.
        deadline_ms: u64,
    },
    /// No node drafted any text this round and none ended the answer. Maps to `UNAVAILABLE`.
    #[error("no node drafted any text this round")]
    NoCandidates,
    /// No verifier returned usable scores this round (all failed, returned NaN/+inf, or the wrong
    /// number of scores). Maps to `UNAVAILABLE`.
    #[error("no verifier returned usable scores this round ({ignored} answers ignored)")]
    NoVerifier {
        /// Number of verifier answers that were received but ignored.
        ignored: usize,
    },
    /// No node returned a usable next-character distribution this step. Maps to `UNAVAILABLE`.
    #[error("no node returned a usable next-character distribution ({skipped} answers skipped)")]
    NoDistribution {
        /// Number of answers that were received but skipped.
        skipped: usize,
    },
}

impl Error {
    /// Builds [`Error::Invalid`]: `field` is wrong, `message` says how.
    pub fn bad_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Builds [`Error::InvalidParameter`].
    pub(crate) fn invalid(
        name: impl Into<String>,
        value: impl std::fmt::Display,
        allowed: &'static str,
    ) -> Self {
        Error::InvalidParameter {
            name: name.into(),
            value: value.to_string(),
            allowed,
        }
    }
}

/// Checks that `value` is finite and strictly positive.
pub(crate) fn check_positive(name: &str, value: f64) -> Result<()> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(name, value, "a finite number > 0"))
    }
}

/// Checks node weights: each finite and > 0, and (when `nodes` is given) one per node.
pub(crate) fn check_weights(weights: &[f64], nodes: Option<usize>) -> Result<()> {
    if let Some(expected) = nodes
        && weights.len() != expected
    {
        return Err(Error::WeightCount {
            expected,
            got: weights.len(),
        });
    }
    if weights.is_empty() {
        return Err(Error::invalid(
            "weights",
            "[]",
            "absent (uniform) or one finite number > 0 per node",
        ));
    }
    for (i, &w) in weights.iter().enumerate() {
        check_positive(&format!("weights[{i}]"), w)?;
    }
    Ok(())
}

/// Returns the weights normalised to sum to 1: uniform when `weights` is `None`.
pub(crate) fn normalised_weights(weights: Option<&[f64]>, nodes: usize) -> Result<Vec<f64>> {
    if nodes == 0 {
        return Err(Error::NoNodes);
    }
    match weights {
        None => Ok(vec![1.0 / nodes as f64; nodes]),
        Some(w) => {
            check_weights(w, Some(nodes))?;
            let total: f64 = w.iter().sum();
            if !(total.is_finite() && total > 0.0) {
                return Err(Error::invalid(
                    "weights",
                    format!("{w:?}"),
                    "numbers whose sum is finite",
                ));
            }
            Ok(w.iter().map(|x| x / total).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_parameter_value_and_range() {
        let e = Error::invalid("exit.delta", 1.5, "a finite number in [0, 1]");
        assert_eq!(
            e.to_string(),
            "invalid parameter `exit.delta` = 1.5: must be a finite number in [0, 1]"
        );
        let e = Error::WeightCount { expected: 3, got: 2 };
        assert!(e.to_string().contains("2 weights given for 3 nodes"));
    }

    #[test]
    fn weights_are_normalised_and_checked() {
        assert_eq!(normalised_weights(None, 4), Ok(vec![0.25; 4]));
        assert_eq!(normalised_weights(Some(&[1.0, 3.0]), 2), Ok(vec![0.25, 0.75]));
        assert_eq!(normalised_weights(None, 0), Err(Error::NoNodes));
        let e = normalised_weights(Some(&[1.0, f64::NAN]), 2);
        assert!(matches!(e, Err(Error::InvalidParameter { ref name, .. }) if name == "weights[1]"));
        let e = normalised_weights(Some(&[1.0, 0.0]), 2);
        assert!(matches!(e, Err(Error::InvalidParameter { ref name, .. }) if name == "weights[1]"));
        assert_eq!(
            normalised_weights(Some(&[1.0]), 2),
            Err(Error::WeightCount { expected: 2, got: 1 })
        );
        // Finite weights whose sum overflows are refused too.
        assert!(normalised_weights(Some(&[f64::MAX, f64::MAX]), 2).is_err());
    }
}
