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
    /// The last background probe's failure (none: it answered, or none ran yet).
    probe_error: Option<String>,
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
        s.probe_error = None;
    }

    /// A call failed in a way that counts; returns the ejection time when this failure ejects the
    /// member. A failure while the member is ejected already is one of the calls that were in flight
    /// when it was ejected (several requests' calls time out together on a hung node): it neither
    /// ejects again nor lengthens the ejection.
    pub fn failure(&self) -> Option<Duration> {
        if self.after == 0 {
            return None;
        }
        let mut s = self.state();
        if s.until.is_some_and(|u| u > Instant::now()) {
            return None;
        }
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

    /// A background probe answered: the member is up (and back in, if it was ejected).
    pub fn probe_ok(&self) -> bool {
        let mut s = self.state();
        let was_down = s.probe_error.take().is_some() || s.until.is_some();
        s.consecutive = 0;
        s.until = None;
        was_down
    }

    /// A background probe failed with `error`: the member is down (readiness, `/health`). A member
    /// already ejected stays ejected while its probes fail (no trial call pays a deadline for it); one
    /// that is not is left to its calls, so a node that is still starting is not ejected by the probe
    /// that ran before it listened. Returns whether it was up.
    pub fn probe_failed(&self, error: String) -> bool {
        let mut s = self.state();
        let was_up = s.probe_error.is_none();
        s.probe_error = Some(error);
        let now = Instant::now();
        if let Some(until) = s.until
            && until > now
        {
            s.until = Some(until.max(now + self.base));
        }
        was_up
    }

    /// Whether the member counts as up: its last probe (if any) answered and it is not ejected now.
    /// `Err` says why not.
    pub fn up(&self) -> Result<(), String> {
        let s = self.state();
        if let Some(e) = &s.probe_error {
            return Err(e.clone());
        }
        match s.until.and_then(|u| u.checked_duration_since(Instant::now())) {
            Some(left) => Err(format!(
                "ejected for {} ms more after failed calls",
                left.as_millis()
            )),
            None => Ok(()),
        }
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
    fn calls_in_flight_at_the_ejection_do_not_eject_again() {
        // Four requests' calls time out together on a hung node: one ejection, of the base time.
        let o = Outlier::new(1, Duration::from_secs(60));
        assert_eq!(o.failure(), Some(Duration::from_secs(60)));
        for _ in 0..3 {
            assert_eq!(o.failure(), None);
        }
        assert_eq!(o.ejections(), 1);
        assert!(o.ejected_for().is_some_and(|d| d <= Duration::from_secs(60)));
        // Once the ejection is over, the next failure (the trial call's) ejects for longer.
        let o = Outlier::new(1, Duration::from_millis(20));
        assert!(o.failure().is_some());
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(o.failure(), Some(Duration::from_millis(40)));
        assert_eq!(o.ejections(), 2);
    }

    #[test]
    fn probes_mark_down_keep_an_ejection_and_reinstate_but_never_eject() {
        let o = Outlier::new(1, Duration::from_millis(50));
        assert!(o.probe_failed("refused".into()), "was up");
        assert_eq!(o.up(), Err("refused".into()));
        assert!(o.ejected_for().is_none(), "a probe alone does not eject");
        assert!(o.probe_ok());
        assert_eq!(o.up(), Ok(()));
        assert!(o.failure().is_some());
        std::thread::sleep(Duration::from_millis(30));
        assert!(o.probe_failed("hung".into()), "its last probe had answered");
        // The failing probe keeps the ejection at least a base time from now.
        assert!(o.ejected_for().is_some_and(|d| d > Duration::from_millis(40)));
        assert!(
            o.probe_ok(),
            "an answer reinstates before the ejection time is over"
        );
        assert!(o.ejected_for().is_none());
        assert_eq!(o.up(), Ok(()));
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
