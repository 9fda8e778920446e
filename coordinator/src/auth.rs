//! Bearer-token authentication of the coordinator's clients (gRPC `Ensemble` service and the HTTP
//! `/v1` API): `authorization: Bearer <key>`, compared in constant time against the configured keys.
//! Keys never reach a log line, an error message or a `Debug` print; health, reflection and
//! `/metrics` stay open (probes and scrapers carry no key).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use subtle::ConstantTimeEq as _;

/// The accepted API keys; empty: authentication off.
#[derive(Clone, Default)]
pub struct ApiKeys(Arc<Vec<Vec<u8>>>);

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeys({} configured, values redacted)", self.0.len())
    }
}

/// Why a request was refused (the message is safe to return and to log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `authorization` header/metadata, or not a bearer token.
    Missing,
    /// A bearer token that matches no key.
    Invalid,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::Missing => "missing API key: send the header `authorization: Bearer <key>`",
            Refusal::Invalid => "invalid API key",
        })
    }
}

impl ApiKeys {
    /// These keys (surrounding blanks trimmed, empty ones dropped).
    pub fn new<S: AsRef<str>>(keys: impl IntoIterator<Item = S>) -> Self {
        Self(Arc::new(
            keys.into_iter()
                .map(|k| k.as_ref().trim().as_bytes().to_vec())
                .filter(|k| !k.is_empty())
                .collect(),
        ))
    }

    /// One key per line of `path`; blank lines and `#` comments are skipped.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("API key file {}: {e}", path.display()))?;
        let keys = Self::new(text.lines().filter(|l| !l.trim_start().starts_with('#')));
        if keys.0.is_empty() {
            return Err(format!("API key file {}: no key in it", path.display()));
        }
        Ok(keys)
    }

    /// These keys and `other`'s.
    pub fn merged(&self, other: &ApiKeys) -> Self {
        Self(Arc::new(self.0.iter().chain(other.0.iter()).cloned().collect()))
    }

    /// Whether any key is configured (authentication on).
    pub fn enabled(&self) -> bool {
        !self.0.is_empty()
    }

    /// Checks an `authorization` value. Always passes when authentication is off.
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<(), Refusal> {
        if !self.enabled() {
            return Ok(());
        }
        let token = authorization
            .and_then(|v| {
                let (scheme, rest) = v.split_at_checked(7)?;
                scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest)
            })
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.is_empty())
            .ok_or(Refusal::Missing)?;
        // Compare against every key, so the time does not tell which one (nearly) matched.
        let hit = self.0.iter().fold(subtle::Choice::from(0u8), |acc, k| {
            acc | k.as_slice().ct_eq(token)
        });
        if bool::from(hit) {
            Ok(())
        } else {
            Err(Refusal::Invalid)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_checked_and_never_printed() {
        let keys = ApiKeys::new(["s3cret-one", " s3cret-two ", ""]);
        assert!(keys.enabled());
        assert_eq!(keys.check(Some(b"Bearer s3cret-one")), Ok(()));
        assert_eq!(keys.check(Some(b"bearer s3cret-two")), Ok(()));
        assert_eq!(keys.check(Some(b"Bearer s3cret")), Err(Refusal::Invalid));
        assert_eq!(keys.check(Some(b"Bearer s3cret-one2")), Err(Refusal::Invalid));
        assert_eq!(keys.check(Some(b"Basic s3cret-one")), Err(Refusal::Missing));
        assert_eq!(keys.check(Some(b"Bearer ")), Err(Refusal::Missing));
        assert_eq!(keys.check(None), Err(Refusal::Missing));
        let shown = format!("{keys:?} {} {}", Refusal::Missing, Refusal::Invalid);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert_eq!(ApiKeys::default().check(None), Ok(()));
    }
}
