//! Prometheus metrics of one node, named after text-generation-inference / vLLM conventions with an
//! `ensemble_node_` prefix, and the `/metrics` HTTP endpoint that serves them.
//!
//! Counters and histograms are updated by the service as each RPC ends; the gauges (sessions, KV
//! bytes, queue depth) are read from the engine's [`Totals`] at scrape time. Each node owns its
//! registry, so several nodes in one process (tests) never mix their numbers.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ensemble_proto::v1 as pb;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use tokio::net::TcpListener;

use ensemble_proto::status_name as code_name;

use crate::engine::{Totals, Usage};

/// Latency buckets, seconds: 1 ms to ~65 s, doubling.
fn latency_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.001, 2.0, 17).unwrap_or_default()
}

/// Per-token buckets, seconds: 0.1 ms to ~3 s, doubling.
fn token_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.0001, 2.0, 15).unwrap_or_default()
}

/// The node's metrics (see the README's metrics table for names and units).
pub struct NodeMetrics {
    registry: Registry,
    totals: Arc<Totals>,
    requests: IntCounterVec,
    duration: HistogramVec,
    queue: HistogramVec,
    per_token: Histogram,
    generated_tokens: IntCounter,
    scored_candidates: IntCounter,
    computed_positions: IntCounter,
    reused_positions: IntCounter,
    forward_passes: IntCounter,
    decode_steps: IntCounter,
    decode_rows: IntCounter,
    merged_score_rows: IntCounter,
    merged_walk_rows: IntCounter,
    sessions: IntGauge,
    kv_bytes: IntGauge,
    queue_depth: IntGauge,
}

fn registered<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    // Names are fixed and unique within this registry: registration cannot collide.
    let _ = r.register(Box::new(c.clone()));
    c
}

impl NodeMetrics {
    /// Metrics over `totals`, labelled with the node's `info` (model, architecture, device, dtype).
    pub fn new(totals: Arc<Totals>, info: &pb::InfoResponse) -> Self {
        let r = Registry::new();
        let counter =
            |name: &str, help: &str| registered(&r, IntCounter::new(name, help).expect("valid metric name"));
        let gauge =
            |name: &str, help: &str| registered(&r, IntGauge::new(name, help).expect("valid metric name"));
        let hist = |name: &str, help: &str, buckets: Vec<f64>, labels: &[&str]| {
            registered(
                &r,
                HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                    .expect("valid metric name"),
            )
        };
        let info_gauge = registered(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "ensemble_node_info",
                    "Always 1; the labels describe the model served.",
                ),
                &["model_id", "architecture", "device", "dtype"],
            )
            .expect("valid metric name"),
        );
        info_gauge
            .with_label_values(&[&info.model_id, &info.architecture, &info.device, &info.dtype])
            .set(1);
        gauge(
            "ensemble_node_kv_cache_budget_bytes",
            "KV-cache memory budget over all sessions, bytes.",
        )
        .set(info.kv_cache_budget_bytes as i64);
        gauge("ensemble_node_max_sessions", "Most sessions kept.").set(info.max_sessions as i64);
        Self {
            requests: registered(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "ensemble_node_requests_total",
                        "RPCs answered, by method and gRPC status code.",
                    ),
                    &["rpc", "code"],
                )
                .expect("valid metric name"),
            ),
            duration: hist(
                "ensemble_node_request_duration_seconds",
                "RPC latency from arrival to answer, seconds.",
                latency_buckets(),
                &["rpc"],
            ),
            queue: hist(
                "ensemble_node_queue_duration_seconds",
                "Time an RPC waited for the engine, seconds.",
                latency_buckets(),
                &["rpc"],
            ),
            per_token: registered(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "ensemble_node_time_per_output_token_seconds",
                        "Engine time per drafted token of ProposeSegment, seconds.",
                    )
                    .buckets(token_buckets()),
                )
                .expect("valid metric name"),
            ),
            generated_tokens: counter(
                "ensemble_node_generated_tokens_total",
                "Tokens drafted by ProposeSegment.",
            ),
            scored_candidates: counter(
                "ensemble_node_scored_candidates_total",
                "Candidates scored by ScoreCandidates.",
            ),
            computed_positions: counter(
                "ensemble_node_forward_positions_total",
                "Positions run through the model (prefill and decode), padding excluded.",
            ),
            reused_positions: counter(
                "ensemble_node_reused_positions_total",
                "Context positions served from a session's KV cache instead of recomputed.",
            ),
            forward_passes: counter(
                "ensemble_node_forward_passes_total",
                "Forward passes (a batch counts once).",
            ),
            decode_steps: counter(
                "ensemble_node_decode_steps_total",
                "Batched decode passes: one per step of the running proposals.",
            ),
            decode_rows: counter(
                "ensemble_node_decode_rows_total",
                "Sequences advanced by the batched decode passes (rows / steps = mean batch size).",
            ),
            merged_score_rows: counter(
                "ensemble_node_decode_merged_score_rows_total",
                "Scored candidates' positions computed inside batched decode passes, beside the decode rows.",
            ),
            merged_walk_rows: counter(
                "ensemble_node_decode_merged_walk_rows_total",
                "Next-character and string-prefix walks' positions computed inside batched decode passes, beside the decode rows.",
            ),
            sessions: gauge("ensemble_node_sessions", "Sessions held now."),
            kv_bytes: gauge("ensemble_node_kv_cache_bytes", "KV-cache bytes held now."),
            queue_depth: gauge("ensemble_node_queue_depth", "Calls waiting for the engine now."),
            registry: r,
            totals,
        }
    }

    /// Records one finished RPC.
    pub fn rpc(&self, rpc: &str, code: tonic::Code, elapsed: Duration) {
        self.requests.with_label_values(&[rpc, code_name(code)]).inc();
        self.duration
            .with_label_values(&[rpc])
            .observe(elapsed.as_secs_f64());
    }

    /// Records the engine work of one successful call.
    pub fn usage(&self, rpc: &str, u: &Usage) {
        self.queue.with_label_values(&[rpc]).observe(u.queue_ms / 1e3);
        self.computed_positions.inc_by(u.computed_positions as u64);
        self.reused_positions.inc_by(u.reused_positions as u64);
        self.forward_passes.inc_by(u.forward_passes as u64);
    }

    /// Records a proposal of `tokens` tokens that took `compute_ms`.
    pub fn drafted(&self, tokens: usize, compute_ms: f64) {
        self.generated_tokens.inc_by(tokens as u64);
        if tokens > 0 {
            self.per_token.observe(compute_ms / 1e3 / tokens as f64);
        }
    }

    /// Records `n` scored candidates.
    pub fn scored(&self, n: usize) {
        self.scored_candidates.inc_by(n as u64);
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let t = &self.totals;
        self.sessions.set(t.sessions.load(Ordering::Relaxed) as i64);
        self.kv_bytes.set(t.kv_bytes.load(Ordering::Relaxed) as i64);
        self.queue_depth.set(t.queued.load(Ordering::Relaxed) as i64);
        // Counters that follow the engine's own totals (only ever increase).
        for (c, total) in [
            (&self.decode_steps, &t.batched_steps),
            (&self.decode_rows, &t.batched_rows),
            (&self.merged_score_rows, &t.merged_score_rows),
            (&self.merged_walk_rows, &t.merged_walk_rows),
        ] {
            c.inc_by(total.load(Ordering::Relaxed).saturating_sub(c.get()));
        }
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }
}

/// Serves `GET /metrics` and `GET /health` on `listener` until `shutdown` resolves. `/health` is the
/// HTTP twin of `grpc.health.v1` for probes that cannot speak gRPC over TLS: 200 `SERVING` while
/// `serving` is set, 503 `NOT_SERVING` once the drain has started.
pub async fn serve(
    metrics: Arc<NodeMetrics>,
    serving: Arc<std::sync::atomic::AtomicBool>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        m.render(),
                    )
                }
            }),
        )
        .route(
            "/health",
            get(move || async move {
                if serving.load(Ordering::Relaxed) {
                    (StatusCode::OK, "SERVING")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING")
                }
            }),
        );
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|s| ensemble_proto::net::set_nodelay(s));
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
