//! The `ModelNode` gRPC service: validate, hand the job to the engine, map the reply. One tracing span
//! per RPC with numeric fields, parented on the caller's W3C trace context when it sends one; every
//! RPC is counted in the node's [`NodeMetrics`].

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use ensemble_proto::limits::InputLimits;
use ensemble_proto::v1 as pb;
use ensemble_proto::v1::model_node_server::ModelNode;
use tonic::{Request, Response, Status};
use tracing::{Instrument, Span, field::Empty, info_span};

use crate::chars::{CharDistribution, CharOptions};
use crate::engine::{EngineHandle, Finish, Job, Reply, Usage};
use crate::error::Error;
use crate::metrics::NodeMetrics;
use crate::validate;

/// The service: a handle to the engine plus the static description.
#[derive(Clone)]
pub struct NodeService {
    engine: EngineHandle,
    info: Arc<pb::InfoResponse>,
    char_defaults: CharOptions,
    metrics: Arc<NodeMetrics>,
    input: InputLimits,
}

impl NodeService {
    /// A service over a running engine.
    pub fn new(engine: EngineHandle, info: pb::InfoResponse, char_defaults: CharOptions) -> Self {
        let metrics = Arc::new(NodeMetrics::new(engine.totals().clone(), &info));
        Self {
            engine,
            info: Arc::new(info),
            char_defaults,
            metrics,
            input: InputLimits::default(),
        }
    }

    /// With these input size limits (checked before anything is tokenized).
    pub fn with_input(mut self, input: InputLimits) -> Self {
        self.input = input;
        self
    }

    /// The node's metrics (served on `/metrics`).
    pub fn metrics(&self) -> &Arc<NodeMetrics> {
        &self.metrics
    }

    /// Counts a finished RPC and records its status code on its span.
    fn observed<T>(
        &self,
        rpc: &str,
        started: Instant,
        span: &Span,
        r: Result<Response<T>, Status>,
    ) -> Result<Response<T>, Status> {
        let code = r.as_ref().map_or_else(|s| s.code(), |_| tonic::Code::Ok);
        span.record("code", ensemble_proto::status_name(code));
        self.metrics.rpc(rpc, code, started.elapsed());
        r
    }
}

fn usage(u: &Usage) -> pb::Usage {
    pb::Usage {
        context_tokens: u.context_tokens as u32,
        reused_positions: u.reused_positions as u32,
        computed_positions: u.computed_positions as u32,
        forward_passes: u.forward_passes as u32,
        queue_ms: u.queue_ms,
        compute_ms: u.compute_ms,
        forward_ms: u.forward_ms,
    }
}

fn record(span: &Span, u: &Usage) {
    span.record("context_tokens", u.context_tokens as i64);
    span.record("computed_positions", u.computed_positions as i64);
    span.record("forward_passes", u.forward_passes as i64);
    span.record("queue_ms", u.queue_ms);
    span.record("compute_ms", u.compute_ms);
}

fn unexpected() -> Status {
    Status::internal("engine answered a different job (bug)")
}

macro_rules! rpc_span {
    ($name:literal) => {
        info_span!(
            "rpc",
            rpc = $name,
            context_tokens = Empty,
            computed_positions = Empty,
            forward_passes = Empty,
            queue_ms = Empty,
            compute_ms = Empty,
            items = Empty,
            code = Empty
        )
    };
}

async fn run(engine: &EngineHandle, job: Job, span: &Span) -> Result<Reply, Status> {
    engine.call(job).await.map_err(|e: Error| {
        let status = Status::from(e);
        tracing::debug!(parent: span, error = %status.message(), "rpc failed");
        status
    })
}

/// The RPC's span, a child of the caller's trace when the metadata carries one.
fn span_for<T>(span: Span, req: &Request<T>) -> Span {
    ensemble_proto::telemetry::set_parent(&span, req.metadata());
    span
}

#[tonic::async_trait]
impl ModelNode for NodeService {
    async fn info(&self, _req: Request<pb::InfoRequest>) -> Result<Response<pb::InfoResponse>, Status> {
        let started = Instant::now();
        let t = self.engine.totals();
        let mut info = (*self.info).clone();
        info.active_sessions = t.sessions.load(Ordering::Relaxed) as u32;
        info.kv_cache_bytes = t.kv_bytes.load(Ordering::Relaxed);
        info.queued_calls = t.queued.load(Ordering::Relaxed) as u32;
        info.calls_done = t.jobs.load(Ordering::Relaxed);
        self.metrics.rpc("Info", tonic::Code::Ok, started.elapsed());
        Ok(Response::new(info))
    }

    async fn propose_segment(
        &self,
        req: Request<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeResponse>, Status> {
        let started = Instant::now();
        let span = span_for(rpc_span!("ProposeSegment"), &req);
        let r = async {
            validate::input(req.get_ref().context.as_ref(), &self.input)?;
            let (ctx, params) = validate::propose(req.into_inner())?;
            let Reply::Proposal(p) = run(&self.engine, Job::Propose(ctx, params), &span).await? else {
                return Err(unexpected());
            };
            record(&span, &p.usage);
            span.record("items", p.token_logprobs.len() as i64);
            self.metrics.usage("ProposeSegment", &p.usage);
            self.metrics.drafted(p.token_logprobs.len(), p.usage.compute_ms);
            let finish = match p.finish {
                Finish::Eos => pb::FinishReason::Eos,
                Finish::Length => pb::FinishReason::Length,
                Finish::Stop => pb::FinishReason::Stop,
                Finish::Defer => pb::FinishReason::Defer,
            };
            Ok(Response::new(pb::ProposeResponse {
                text: p.text,
                token_logprobs: p.token_logprobs,
                finish_reason: finish as i32,
                usage: Some(usage(&p.usage)),
                defer_probs: p.defer_probs,
                defer_head_probs: p.defer_head_probs,
            }))
        }
        .instrument(span.clone())
        .await;
        self.observed("ProposeSegment", started, &span, r)
    }

    async fn score_candidates(
        &self,
        req: Request<pb::ScoreRequest>,
    ) -> Result<Response<pb::ScoreResponse>, Status> {
        let started = Instant::now();
        let span = span_for(rpc_span!("ScoreCandidates"), &req);
        let r = async {
            validate::input(req.get_ref().context.as_ref(), &self.input)?;
            let prefix = req.get_ref().string_prefix;
            let (ctx, cands, ends) = validate::score(req.into_inner())?;
            span.record("items", cands.len() as i64);
            let job = if prefix {
                Job::ScorePrefix(ctx, cands, ends, self.char_defaults.clone())
            } else {
                Job::Score(ctx, cands)
            };
            let Reply::Scores(s) = run(&self.engine, job, &span).await? else {
                return Err(unexpected());
            };
            record(&span, &s.usage);
            self.metrics.usage("ScoreCandidates", &s.usage);
            self.metrics.scored(s.scores.len());
            let scores = s
                .scores
                .iter()
                .map(|c| pb::CandidateScore {
                    sum_logprob: c.sum_logprob,
                    token_count: c.token_count as u32,
                    char_count: c.char_count as u32,
                    mean_logprob: c.mean(),
                })
                .collect();
            Ok(Response::new(pb::ScoreResponse {
                scores,
                usage: Some(usage(&s.usage)),
            }))
        }
        .instrument(span.clone())
        .await;
        self.observed("ScoreCandidates", started, &span, r)
    }

    async fn next_char_distribution(
        &self,
        req: Request<pb::NextCharRequest>,
    ) -> Result<Response<pb::NextCharResponse>, Status> {
        let started = Instant::now();
        let span = span_for(rpc_span!("NextCharDistribution"), &req);
        let r = async {
            validate::input(req.get_ref().context.as_ref(), &self.input)?;
            let (ctx, k, opts) = validate::next_char(req.into_inner(), &self.char_defaults)?;
            let Reply::Chars(c) = run(&self.engine, Job::NextChar(ctx, k, opts), &span).await? else {
                return Err(unexpected());
            };
            record(&span, &c.usage);
            span.record("items", c.hypotheses as i64);
            self.metrics.usage("NextCharDistribution", &c.usage);
            let d = char_dist(&c.dist);
            Ok(Response::new(pb::NextCharResponse {
                chars: d.chars,
                eos_prob: d.eos_prob,
                residual: d.residual,
                hypotheses: c.hypotheses as u32,
                usage: Some(usage(&c.usage)),
            }))
        }
        .instrument(span.clone())
        .await;
        self.observed("NextCharDistribution", started, &span, r)
    }

    async fn next_char_distributions(
        &self,
        req: Request<pb::NextCharsRequest>,
    ) -> Result<Response<pb::NextCharsResponse>, Status> {
        let started = Instant::now();
        let span = span_for(rpc_span!("NextCharDistributions"), &req);
        let r = async {
            validate::input(req.get_ref().context.as_ref(), &self.input)?;
            let (ctx, params) = validate::next_chars(req.into_inner(), &self.char_defaults)?;
            let Reply::CharRun(c) = run(&self.engine, Job::NextChars(ctx, params), &span).await? else {
                return Err(unexpected());
            };
            record(&span, &c.usage);
            span.record("items", c.positions.len() as i64);
            self.metrics.usage("NextCharDistributions", &c.usage);
            Ok(Response::new(pb::NextCharsResponse {
                positions: c
                    .positions
                    .iter()
                    .enumerate()
                    .map(|(i, d)| pb::CharDistribution {
                        observed: c.observed.get(i).copied(),
                        ..char_dist(d)
                    })
                    .collect(),
                drafted: c.drafted,
                hypotheses: c.hypotheses as u32,
                usage: Some(usage(&c.usage)),
            }))
        }
        .instrument(span.clone())
        .await;
        self.observed("NextCharDistributions", started, &span, r)
    }

    async fn close_session(
        &self,
        req: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        let started = Instant::now();
        let span = span_for(rpc_span!("CloseSession"), &req);
        let r = async {
            let id = req.into_inner().session_id;
            if id.is_empty() {
                return Err(Status::invalid_argument("session_id is required"));
            }
            let Reply::Closed(existed) = run(&self.engine, Job::Close(id), &span).await? else {
                return Err(unexpected());
            };
            Ok(Response::new(pb::CloseSessionResponse { existed }))
        }
        .instrument(span.clone())
        .await;
        self.observed("CloseSession", started, &span, r)
    }
}

/// One distribution on the wire.
fn char_dist(d: &CharDistribution) -> pb::CharDistribution {
    pb::CharDistribution {
        chars: d
            .chars
            .iter()
            .map(|(ch, p)| pb::CharProb {
                char: ch.to_string(),
                prob: *p,
            })
            .collect(),
        eos_prob: d.eos,
        residual: d.residual,
        observed: None,
    }
}
