//! Prometheus metrics of the coordinator, named after text-generation-inference / vLLM conventions
//! with an `ensemble_` prefix: requests, latencies (request, time to first token, per round, per
//! character), output, node RPCs by status code, and the per-node SpecFuse record (rounds active,
//! rounds won, exits), from which a dashboard derives each node's win rate.
//!
//! One registry per coordinator (tests run several in one process); served on `/metrics` by
//! [`crate::http`].

use std::time::{Duration, Instant};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, exponential_buckets};

use ensemble_proto::status_name as code_name;

use crate::specfuse::RoundOutcome;

/// The coordinator's metrics (see the README's metrics table for names and units).
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    in_flight: IntGauge,
    duration: HistogramVec,
    ttft: HistogramVec,
    round: HistogramVec,
    char_step: HistogramVec,
    output_chars: IntCounterVec,
    steps: IntCounterVec,
    node_rpcs: IntCounterVec,
    node_rpc_duration: HistogramVec,
    node_rounds: IntCounterVec,
    node_wins: IntCounterVec,
    node_exits: IntCounterVec,
    node_failures: IntCounterVec,
    node_ejections: IntCounterVec,
    auth_failures: IntCounterVec,
    http_requests: IntCounterVec,
    spans: IntCounterVec,
    span_chars: IntCounterVec,
    stage: HistogramVec,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    // Every name is fixed and unique within this registry: registration cannot collide.
    let _ = r.register(Box::new(c.clone()));
    c
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Self {
        let r = Registry::new();
        let latency = exponential_buckets(0.001, 2.0, 17).unwrap_or_default();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let hist = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &r,
                HistogramVec::new(HistogramOpts::new(name, help).buckets(latency.clone()), labels)
                    .expect("valid metric"),
            )
        };
        Self {
            spans: counter(
                "ensemble_colm_spans_total",
                "Co-LLM spans of the answer by writer: `base`, or `assistant` (the base deferred); the deferral rate is assistant / all.",
                &["writer"],
            ),
            span_chars: counter(
                "ensemble_colm_chars_total",
                "Co-LLM answer characters by writer (`base`, `assistant`).",
                &["writer"],
            ),
            stage: hist(
                "ensemble_stage_duration_seconds",
                "One FSLM pipeline stage, seconds, by stage index (0 first).",
                &["stage"],
            ),
            requests: counter(
                "ensemble_requests_total",
                "Requests finished, by strategy, API (grpc, http) and gRPC status code.",
                &["strategy", "api", "code"],
            ),
            in_flight: reg(
                &r,
                IntGauge::new("ensemble_requests_in_flight", "Requests running now.").expect("valid metric"),
            ),
            duration: hist(
                "ensemble_request_duration_seconds",
                "Request latency, arrival to last character, seconds.",
                &["strategy"],
            ),
            ttft: hist(
                "ensemble_time_to_first_token_seconds",
                "Arrival to the first accepted text (first SpecFuse round, first CharED character), seconds.",
                &["strategy"],
            ),
            round: hist(
                "ensemble_round_duration_seconds",
                "One SpecFuse round (propose + verify + combine), seconds.",
                &["strategy"],
            ),
            char_step: hist(
                "ensemble_char_step_duration_seconds",
                "One CharED character step, seconds: the per-token latency of a character-level strategy.",
                &["strategy"],
            ),
            output_chars: counter(
                "ensemble_output_chars_total",
                "Characters returned to clients (the ensemble's unit: members tokenize differently).",
                &["strategy"],
            ),
            steps: counter(
                "ensemble_steps_total",
                "Decoding steps: SpecFuse rounds, CharED characters, single-node proposals.",
                &["strategy"],
            ),
            node_rpcs: counter(
                "ensemble_node_rpcs_total",
                "Calls to model nodes, by node, method and gRPC status code (client-side deadline: DEADLINE_EXCEEDED).",
                &["node", "rpc", "code"],
            ),
            node_rpc_duration: hist(
                "ensemble_node_rpc_duration_seconds",
                "Latency of a call to a model node, seconds, retries included.",
                &["node", "rpc"],
            ),
            node_rounds: counter(
                "ensemble_node_rounds_active_total",
                "SpecFuse rounds in which the node was active.",
                &["node"],
            ),
            node_wins: counter(
                "ensemble_node_rounds_won_total",
                "SpecFuse rounds won by the node's draft (win rate = won / active).",
                &["node"],
            ),
            node_exits: counter(
                "ensemble_node_exits_total",
                "Requests in which SpecFuse model exit dropped the node.",
                &["node"],
            ),
            node_failures: counter(
                "ensemble_node_failures_total",
                "Requests that went on without the node after it failed.",
                &["node"],
            ),
            node_ejections: counter(
                "ensemble_node_ejections_total",
                "Times the node was ejected after failing calls (new requests skip it until a trial succeeds).",
                &["node"],
            ),
            http_requests: counter(
                "ensemble_http_requests_total",
                "HTTP requests answered, by route (`other` for unknown paths) and status code.",
                &["route", "status"],
            ),
            auth_failures: counter(
                "ensemble_auth_failures_total",
                "Requests refused for a missing or wrong bearer token, by API.",
                &["api"],
            ),
            registry: r,
        }
    }

    /// A request started. `strategy` must come from a bounded set (the caller maps unknown names to
    /// `invalid`) so that clients cannot grow the label set. [`InFlight::finish`] records how it
    /// ended; a request dropped before (its client went away) is recorded as `CANCELLED`.
    pub fn request_started<'a>(&'a self, strategy: &'a str, api: &'a str) -> InFlight<'a> {
        self.in_flight.inc();
        InFlight {
            metrics: self,
            strategy,
            api,
            started: Instant::now(),
            done: false,
        }
    }

    fn request_done(&self, strategy: &str, api: &str, code: tonic::Code, elapsed: Duration, chars: usize) {
        self.requests
            .with_label_values(&[strategy, api, code_name(code)])
            .inc();
        self.duration
            .with_label_values(&[strategy])
            .observe(elapsed.as_secs_f64());
        self.output_chars
            .with_label_values(&[strategy])
            .inc_by(chars as u64);
    }

    /// Records the time to the first accepted text.
    pub fn first_token(&self, strategy: &str, elapsed: Duration) {
        self.ttft
            .with_label_values(&[strategy])
            .observe(elapsed.as_secs_f64());
    }

    /// Records one SpecFuse round that took `elapsed`; `names` maps node indices to names.
    pub fn round(&self, o: &RoundOutcome, elapsed: Duration, names: &[String]) {
        let name = |i: usize| names.get(i).map_or("?", String::as_str);
        self.round
            .with_label_values(&["specfuse"])
            .observe(elapsed.as_secs_f64());
        self.steps.with_label_values(&["specfuse"]).inc();
        for &i in &o.active {
            self.node_rounds.with_label_values(&[name(i)]).inc();
        }
        self.node_wins.with_label_values(&[name(o.winner.node)]).inc();
        for i in o.exited() {
            self.node_exits.with_label_values(&[name(i)]).inc();
        }
    }

    /// Records one CharED character step.
    pub fn char_step(&self, elapsed: Duration) {
        self.char_step
            .with_label_values(&["chared"])
            .observe(elapsed.as_secs_f64());
        self.steps.with_label_values(&["chared"]).inc();
    }

    /// Records one Co-LLM span of `chars` characters (`deferred`: an assistant's).
    pub fn span(&self, deferred: bool, chars: usize) {
        let writer = if deferred { "assistant" } else { "base" };
        self.spans.with_label_values(&[writer]).inc();
        self.span_chars.with_label_values(&[writer]).inc_by(chars as u64);
        self.steps.with_label_values(&["colm"]).inc();
    }

    /// Records one finished pipeline stage (its index: names are the client's and unbounded) that
    /// took `elapsed`.
    pub fn stage(&self, index: usize, elapsed: Duration) {
        self.stage
            .with_label_values(&[index.to_string().as_str()])
            .observe(elapsed.as_secs_f64());
        self.steps.with_label_values(&["pipeline"]).inc();
    }

    /// Records one step of a single-node request.
    pub fn single_step(&self) {
        self.steps.with_label_values(&["single"]).inc();
    }

    /// Records a node that failed during a request.
    pub fn node_failed(&self, node: &str) {
        self.node_failures.with_label_values(&[node]).inc();
    }

    /// Records an ejection of a node.
    pub fn node_ejected(&self, node: &str) {
        self.node_ejections.with_label_values(&[node]).inc();
    }

    /// Records one call to a node.
    pub fn node_rpc(&self, node: &str, rpc: &str, code: tonic::Code, elapsed: Duration) {
        self.node_rpcs
            .with_label_values(&[node, rpc, code_name(code)])
            .inc();
        self.node_rpc_duration
            .with_label_values(&[node, rpc])
            .observe(elapsed.as_secs_f64());
    }

    /// Records one HTTP response.
    pub fn http_request(&self, route: &str, status: u16) {
        self.http_requests
            .with_label_values(&[route, &status.to_string()])
            .inc();
    }

    /// Records a refused token.
    pub fn auth_failed(&self, api: &str) {
        self.auth_failures.with_label_values(&[api]).inc();
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }
}

/// A running request: counted in `ensemble_requests_in_flight` until dropped.
pub struct InFlight<'a> {
    metrics: &'a Metrics,
    strategy: &'a str,
    api: &'a str,
    started: Instant,
    done: bool,
}

impl InFlight<'_> {
    /// Records the request's end: its status code and the characters returned.
    pub fn finish(mut self, code: tonic::Code, chars: usize) {
        self.done = true;
        self.metrics
            .request_done(self.strategy, self.api, code, self.started.elapsed(), chars);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
        if !self.done {
            self.metrics.request_done(
                self.strategy,
                self.api,
                tonic::Code::Cancelled,
                self.started.elapsed(),
                0,
            );
        }
    }
}
