//! Outlier ejection, as Envoy's outlier detection or a circuit breaker does it: a member whose calls
//! fail `after` times in a row (a deadline, an unreachable or failing node; not the client's own
//! mistakes) is ejected, and new requests skip it at once instead of paying a deadline each. When the
//! ejection time is over, the next call is a trial: success reinstates the member, failure ejects it
//! again for longer (the base time times the number of ejections, at most ten times the base).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::Error;

/// The ejection state of one member (shared by every request).
#[derive(Debug)]
pub struct Outlier {
    after: u32,
    base: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    consecutive: u32,
    ejections: u32,
    until: Option<Instant>,
}

/// Whether a failed call counts against the member: deadlines and node-side faults do; refusals
/// that are the client's (`INVALID_ARGUMENT`), overload (`RESOURCE_EXHAUSTED`) and lost sessions do not.
pub fn counts(e: &Error) -> bool {
    match e {
        Error::Timeout { .. } => true,
        Error::Node { code, .. } => matches!(
            code,
            tonic::Code::Unavailable | tonic::Code::Internal | tonic::Code::Unknown
        ),
        _ => false,
    }
}

impl Outlier {
    /// Ejects after `after` consecutive failures (0: never) for `base` the first time.
    pub fn new(after: u32, base: Duration) -> Self {
        Self {
            after,
            base,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long the member stays ejected (none: it may be called).
    pub fn ejected_for(&self) -> Option<Duration> {
        let until = self.state().until?;
        until.checked_duration_since(Instant::now())
    }

    /// A call succeeded: the member is (again) in.
    pub fn success(&self) {
        let mut s = self.state();
        s.consecutive = 0;
        s.until = None;
    }

    /// A call failed in a way that counts; returns the ejection time when this failure ejects the
    /// member.
    pub fn failure(&self) -> Option<Duration> {
        if self.after == 0 {
            return None;
        }
        let mut s = self.state();
        s.consecutive += 1;
        if s.consecutive < self.after {
            return None;
        }
        s.consecutive = 0;
        s.ejections += 1;
        let time = self.base * s.ejections.min(10);
        s.until = Some(Instant::now() + time);
        Some(time)
    }

    /// Times the member was ejected so far.
    pub fn ejections(&self) -> u32 {
        self.state().ejections
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejects_after_consecutive_failures_and_a_success_reinstates() {
        let o = Outlier::new(2, Duration::from_secs(60));
        assert_eq!(o.failure(), None);
        o.success();
        assert_eq!(o.failure(), None, "the count restarts after a success");
        assert_eq!(o.failure(), Some(Duration::from_secs(60)));
        assert!(o.ejected_for().is_some());
        o.success();
        assert!(o.ejected_for().is_none());
        o.failure();
        assert_eq!(o.failure(), Some(Duration::from_secs(120)), "longer each time");
        assert_eq!(o.ejections(), 2);
        let never = Outlier::new(0, Duration::from_secs(1));
        assert_eq!(never.failure(), None);
        assert!(never.ejected_for().is_none());
    }

    #[test]
    fn only_the_nodes_faults_count() {
        let node = |code| Error::Node {
            node: "a".into(),
            code,
            message: String::new(),
        };
        assert!(counts(&Error::Timeout {
            node: "a".into(),
            deadline_ms: 1
        }));
        assert!(counts(&node(tonic::Code::Unavailable)));
        assert!(!counts(&node(tonic::Code::InvalidArgument)));
        assert!(!counts(&node(tonic::Code::ResourceExhausted)));
    }
}
