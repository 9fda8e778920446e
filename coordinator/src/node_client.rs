//! A client for one model node within one request: it keeps the node's session in step with the
//! request's answer by sending only what was appended since the last call (`ContextDelta`), resends
//! the full context when the node lost the session (`NOT_FOUND`, `FAILED_PRECONDITION`), and bounds
//! every call by a deadline; a client dropped with its session open frees it. Each call is one sample
//! of the coordinator's node-RPC metrics and, at `debug` level (`RUST_LOG=info,coordinator::node_client=debug`),
//! one `node_rpc` span, a child of the request's round or character step. The W3C trace context of that
//! span, or of the step when it is off, travels to the node in the gRPC metadata, so the node's own
//! `rpc` span hangs off the step either way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ensemble_proto::v1 as pb;
use ensemble_proto::v1::model_node_client::ModelNodeClient;
use tonic::transport::Channel;
use tracing::Instrument as _;
use tracing::field::Empty;

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::outlier::{self, Outlier};
use crate::replicas::Replicas;

/// One node, as one request sees it.
pub struct NodeClient {
    /// RTD: the request's λ for every call (`None`: the node's).
    rtd_lambda: Option<f64>,
    name: String,
    client: ModelNodeClient<Channel>,
    /// The replica in use and the member's other replicas (None: a bare channel).
    replica: Option<(String, Arc<Replicas>)>,
    retries: u32,
    retried: u64,
    deadline: Duration,
    session: String,
    prompt: Option<pb::Prompt>,
    answer: String,
    answer_chars: u64,
    /// Answer characters the node's session holds (None: it has no session yet).
    synced: Option<u64>,
    resends: u64,
    /// Calls made: propose, score, next-character.
    calls: [u64; 3],
    metrics: Option<Arc<Metrics>>,
    /// A call may have created the session on the node and `close` has not freed it yet.
    open: bool,
    /// The member's ejection state, shared by every request.
    outlier: Option<Arc<Outlier>>,
}

fn is_lost_session(code: tonic::Code) -> bool {
    matches!(code, tonic::Code::NotFound | tonic::Code::FailedPrecondition)
}

/// Failures worth another try (on another replica when there is one), always with the full
/// context: refused connections, a full queue, and a connection lost mid-call (the node died or
/// restarted: tonic reports it as `UNKNOWN` with the transport error as its source). A deadline is
/// not retried: the request would wait twice as long.
fn is_retryable(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::ResourceExhausted => true,
        tonic::Code::Unknown => {
            std::error::Error::source(status).is_some()
                || status.message().contains("transport error")
                || status.message().contains("h2 protocol error")
        }
        _ => false,
    }
}

/// The gRPC code a failed call counts under.
fn error_code(e: &Error) -> tonic::Code {
    match e {
        Error::Timeout { .. } => tonic::Code::DeadlineExceeded,
        Error::Node { code, .. } => *code,
        _ => tonic::Code::Unknown,
    }
}

macro_rules! call_with_context {
    ($self:ident, $method:ident, $rpc:literal, |$ctx:ident| $req:expr) => {{
        if let Some(left) = $self.outlier.as_ref().and_then(|o| o.ejected_for()) {
            return Err(Error::Ejected {
                node: $self.name.clone(),
                retry_ms: left.as_millis() as u64,
            });
        }
        // Debug level: at info a trace has one span per step and the nodes' own spans under it; the
        // coordinator's per-call spans (client-side latency, retries) are opt-in detail, as they
        // were most of the export cost on calls of ~100 µs (README, coordinator benchmarks).
        let span = tracing::debug_span!(
            "node_rpc",
            node = %$self.name,
            rpc = $rpc,
            full_context = Empty,
            retries = Empty,
            code = Empty
        );
        let started = Instant::now();
        let result = async {
        let mut full = $self.synced.is_none();
        let mut attempts = 0u32;
        loop {
            let $ctx = Some($self.context(full));
            let mut request = tonic::Request::new($req);
            request.set_timeout($self.deadline);
            ensemble_proto::telemetry::inject(&span, request.metadata_mut());
            $self.open |= !$self.session.is_empty();
            span.record("full_context", full);
            span.record("retries", i64::from(attempts));
            let outcome = tokio::time::timeout($self.deadline, $self.client.$method(request)).await;
            match outcome {
                Err(_) => {
                    $self.synced = None;
                    return Err(Error::Timeout {
                        node: $self.name.clone(),
                        deadline_ms: $self.deadline.as_millis() as u64,
                    });
                }
                Ok(Ok(resp)) => {
                    $self.synced = Some($self.answer_chars);
                    return Ok(resp.into_inner());
                }
                Ok(Err(status)) if !full && is_lost_session(status.code()) => {
                    $self.resends += 1;
                    full = true;
                }
                Ok(Err(status)) if attempts < $self.retries && is_retryable(&status) => {
                    attempts += 1;
                    $self.retried += 1;
                    tracing::debug!(node = %$self.name, code = ?status.code(), attempts, "retrying on the next replica");
                    $self.fail_over();
                    full = true;
                    tokio::time::sleep(Duration::from_millis(20 * u64::from(attempts))).await;
                }
                Ok(Err(status)) => {
                    $self.synced = None;
                    // tonic reports its own client-side deadline as CANCELLED "Timeout expired".
                    if matches!(
                        status.code(),
                        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
                    ) {
                        return Err(Error::Timeout {
                            node: $self.name.clone(),
                            deadline_ms: $self.deadline.as_millis() as u64,
                        });
                    }
                    return Err(Error::Node {
                        node: $self.name.clone(),
                        code: status.code(),
                        message: status.message().to_owned(),
                    });
                }
            }
        }
        }
        .instrument(span.clone())
        .await;
        let code = result.as_ref().map_or_else(error_code, |_| tonic::Code::Ok);
        span.record("code", ensemble_proto::status_name(code));
        if let Some(m) = &$self.metrics {
            m.node_rpc(&$self.name, $rpc, code, started.elapsed());
        }
        $self.judge($rpc, &result);
        result
    }};
}

impl NodeClient {
    /// A client over an open channel (no retries).
    pub fn new(name: impl Into<String>, channel: Channel, deadline: Duration) -> Self {
        Self {
            name: name.into(),
            client: ModelNodeClient::new(channel),
            replica: None,
            retries: 0,
            retried: 0,
            deadline,
            session: String::new(),
            rtd_lambda: None,
            prompt: None,
            answer: String::new(),
            answer_chars: 0,
            synced: None,
            resends: 0,
            calls: [0; 3],
            metrics: None,
            open: false,
            outlier: None,
        }
    }

    /// Counts every call in `metrics`.
    pub fn metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// A client on the next replica of a member (round-robin); a member with no replica yet gets a
    /// channel to nowhere, whose calls fail as UNAVAILABLE.
    pub fn with_replicas(name: impl Into<String>, replicas: Arc<Replicas>, deadline: Duration) -> Self {
        let name = name.into();
        match replicas.pick() {
            Some(r) => {
                let mut c = Self::new(name, r.channel, deadline);
                c.replica = Some((r.url, replicas));
                c
            }
            None => {
                let channel = tonic::transport::Endpoint::from_static("http://0.0.0.0:1").connect_lazy();
                let mut c = Self::new(name, channel, deadline);
                c.replica = Some((String::new(), replicas));
                c
            }
        }
    }

    /// Retries of a refused or unavailable call (each on the next replica).
    pub fn retries(mut self, n: u32) -> Self {
        self.retries = n;
        self
    }

    /// Moves to the next replica (the same one when it is alone); its session must be rebuilt.
    fn fail_over(&mut self) {
        if let Some((url, replicas)) = &mut self.replica
            && let Some(next) = replicas.after(url)
        {
            *url = next.url;
            self.client = ModelNodeClient::new(next.channel);
        }
        self.synced = None;
    }

    /// The replica in use (empty for a bare channel).
    pub fn url(&self) -> &str {
        self.replica.as_ref().map_or("", |r| r.0.as_str())
    }

    /// Calls retried after a refused or unavailable answer.
    pub fn retried(&self) -> u64 {
        self.retried
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// RTD: the λ every call of this request asks of nodes that serve a reference store.
    pub fn set_rtd_lambda(&mut self, lambda: Option<f64>) {
        self.rtd_lambda = lambda;
    }

    /// The session id of the request in progress (empty before `begin` and after `close`).
    pub fn session(&self) -> &str {
        &self.session
    }

    /// Starts a request: its session id (unique per request) and prompt. A session still open from
    /// an earlier `begin` (a pipeline's earlier stage) is freed in the background.
    pub fn begin(&mut self, session: impl Into<String>, prompt: pb::Prompt) {
        drop(self.close_in_background());
        self.session = session.into();
        self.prompt = Some(prompt);
        self.answer.clear();
        self.answer_chars = 0;
        self.synced = None;
    }

    /// Text the ensemble accepted: the answer grows (the node hears of it with the next call).
    pub fn accept(&mut self, text: &str) {
        self.answer.push_str(text);
        self.answer_chars += text.chars().count() as u64;
    }

    /// Calls made so far: (propose, score, next-character); a resend is not a new call.
    pub fn calls(&self) -> (u64, u64, u64) {
        (self.calls[0], self.calls[1], self.calls[2])
    }

    /// How many times the node had lost the session and the full context was resent.
    pub fn resends(&self) -> u64 {
        self.resends
    }

    fn context(&self, full: bool) -> pb::Context {
        let body = match (full, self.synced) {
            (false, Some(base)) => {
                let skip = usize::try_from(base).unwrap_or(usize::MAX);
                let start = self
                    .answer
                    .char_indices()
                    .nth(skip)
                    .map_or(self.answer.len(), |(i, _)| i);
                pb::context::Body::Delta(pb::ContextDelta {
                    base_chars: base,
                    append: self.answer[start..].to_owned(),
                })
            }
            _ => pb::context::Body::Full(pb::FullContext {
                prompt: self.prompt.clone(),
                answer: self.answer.clone(),
            }),
        };
        pb::Context {
            rtd_lambda: self.rtd_lambda,
            session_id: self.session.clone(),
            body: Some(body),
        }
    }

    /// Drafts the next segment.
    pub async fn propose(
        &mut self,
        max_new_tokens: u32,
        stop: &[String],
        sampling: pb::Sampling,
    ) -> Result<pb::ProposeResponse> {
        self.propose_deferring(max_new_tokens, stop, sampling, None).await
    }

    /// [`NodeClient::propose`] that stops before the first token the node's deferral head hands to an
    /// assistant (Co-LLM), when `defer_threshold` is set.
    pub async fn propose_deferring(
        &mut self,
        max_new_tokens: u32,
        stop: &[String],
        sampling: pb::Sampling,
        defer_threshold: Option<f64>,
    ) -> Result<pb::ProposeResponse> {
        self.calls[0] += 1;
        call_with_context!(self, propose_segment, "ProposeSegment", |context| {
            pb::ProposeRequest {
                context,
                max_new_tokens,
                stop: stop.to_vec(),
                sampling: Some(sampling),
                defer_threshold,
            }
        })
    }

    /// Scores candidate continuations (as string prefixes with `string_prefix`).
    pub async fn score(
        &mut self,
        candidates: &[String],
        string_prefix: bool,
        ends_answer: &[bool],
    ) -> Result<pb::ScoreResponse> {
        self.calls[1] += 1;
        call_with_context!(self, score_candidates, "ScoreCandidates", |context| {
            pb::ScoreRequest {
                context,
                candidates: candidates.to_vec(),
                string_prefix,
                ends_answer: ends_answer.to_vec(),
            }
        })
    }

    /// The next-character distribution.
    pub async fn next_char(
        &mut self,
        top_k: u32,
        max_hypotheses: Option<u32>,
        lookahead: Option<bool>,
    ) -> Result<pb::NextCharResponse> {
        self.calls[2] += 1;
        call_with_context!(self, next_char_distribution, "NextCharDistribution", |context| {
            pb::NextCharRequest {
                context,
                top_k,
                max_hypotheses,
                lookahead,
            }
        })
    }

    /// The next-character distributions at every position of `continuation` (not appended to the
    /// answer), then along up to `draft_chars` characters of the node's own greedy draft.
    pub async fn next_chars(
        &mut self,
        continuation: &str,
        draft_chars: u32,
        top_k: u32,
        max_hypotheses: Option<u32>,
        lookahead: Option<bool>,
    ) -> Result<pb::NextCharsResponse> {
        self.next_chars_call(pb::NextCharsRequest {
            context: None,
            continuation: continuation.to_owned(),
            draft_chars,
            top_k,
            max_hypotheses,
            lookahead,
            observed: false,
        })
        .await
    }

    /// The exact probability of each character of `continuation` after the answer so far and the
    /// continuation's characters before it (not appended), and the entropy (nats) of the node's
    /// distribution there over its `top_k` listed characters, EOS and the residual as one outcome
    /// ([`crate::strategy::chared::entropy`]): one call, positions `0..n`; and the node's usage.
    pub async fn observed_chars(
        &mut self,
        continuation: &str,
        top_k: u32,
    ) -> Result<(Vec<(f64, f64)>, pb::Usage)> {
        let r = self
            .next_chars_call(pb::NextCharsRequest {
                context: None,
                continuation: continuation.to_owned(),
                top_k,
                observed: true,
                ..Default::default()
            })
            .await?;
        let n = continuation.chars().count();
        let out: Vec<(f64, f64)> = r
            .positions
            .iter()
            .take(n)
            .map(|d| {
                let masses = d.chars.iter().map(|c| c.prob).chain([d.eos_prob, d.residual]);
                (
                    d.observed.unwrap_or(0.0),
                    crate::strategy::chared::entropy(masses),
                )
            })
            .collect();
        if out.len() != n {
            return Err(Error::Node {
                node: self.name.clone(),
                code: tonic::Code::Internal,
                message: format!("{} positions for {n} characters", out.len()),
            });
        }
        Ok((out, r.usage.unwrap_or_default()))
    }

    /// One `NextCharDistributions` call: `req` with this request's context.
    async fn next_chars_call(&mut self, req: pb::NextCharsRequest) -> Result<pb::NextCharsResponse> {
        self.calls[2] += 1;
        call_with_context!(
            self,
            next_char_distributions,
            "NextCharDistributions",
            |context| pb::NextCharsRequest {
                context,
                ..req.clone()
            }
        )
    }

    /// Shares the member's ejection state: calls are skipped while it is ejected, and their outcomes
    /// move it.
    pub fn outlier(mut self, o: Arc<Outlier>) -> Self {
        self.outlier = Some(o);
        self
    }

    /// Feeds a call's outcome to the ejection state; a failure of the node's own is logged at `warn`.
    fn judge<T>(&self, rpc: &str, result: &Result<T>) {
        match result {
            Ok(_) => {
                if let Some(o) = &self.outlier {
                    o.success();
                }
            }
            Err(e) if outlier::counts(e) => {
                tracing::warn!(node = %self.name, rpc, error = %e, "node call failed");
                if let Some(time) = self.outlier.as_ref().and_then(|o| o.failure()) {
                    tracing::warn!(node = %self.name, rpc, eject_ms = time.as_millis() as u64, "node ejected: new requests skip it until a trial call succeeds");
                    if let Some(m) = &self.metrics {
                        m.node_ejected(&self.name);
                    }
                }
            }
            Err(_) => {}
        }
    }

    /// Frees the node's session (best effort: a node that is gone has nothing to free). The call runs
    /// in its own task, bounded by the node's deadline; the caller waits for it at most [`CLOSE_WAIT`],
    /// so a hung node does not cost the request a second deadline (its close goes on in the
    /// background).
    pub async fn close(&mut self) {
        if let Some(task) = self.close_in_background() {
            let _ = tokio::time::timeout(CLOSE_WAIT, task).await;
        }
    }

    /// Starts `CloseSession` for the open session in its own task (none when nothing is open or no
    /// runtime is running) and forgets the session.
    fn close_in_background(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        let was_open = std::mem::replace(&mut self.open, false);
        self.synced = None;
        let session = std::mem::take(&mut self.session);
        if !was_open || session.is_empty() {
            return None;
        }
        // Outside a runtime (process exit): the node evicts the session in time.
        let rt = tokio::runtime::Handle::try_current().ok()?;
        let (mut client, deadline) = (self.client.clone(), self.deadline);
        let mut request = tonic::Request::new(pb::CloseSessionRequest { session_id: session });
        request.set_timeout(deadline);
        let span = tracing::debug_span!("node_rpc", node = %self.name, rpc = "CloseSession");
        ensemble_proto::telemetry::inject(&span, request.metadata_mut());
        Some(
            rt.spawn(
                async move {
                    let _ = tokio::time::timeout(deadline, client.close_session(request)).await;
                }
                .instrument(span),
            ),
        )
    }
}

/// How long a request waits for its nodes to confirm `CloseSession` before it answers (the calls go on
/// in the background, each bounded by its node's deadline).
pub const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// A client dropped with its session still open (the request was abandoned mid-await: a unary
/// client went away, or a call failed past the point where the driver closes) frees it in the
/// background, so the node does not hold the KV cache until LRU eviction.
impl Drop for NodeClient {
    fn drop(&mut self) {
        drop(self.close_in_background());
    }
}
