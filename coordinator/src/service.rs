//! The `Ensemble` gRPC service: validates a request, gives every configured node a [`NodeClient`]
//! for it, runs the strategy (unary, or streamed with a trace of every step), and maps the crate's
//! [`Error`] to a gRPC status in one place.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ensemble_proto::v1 as pb;
use ensemble_proto::v1::ensemble_server::Ensemble;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;
use tracing::field::Empty;

use crate::chared::{CharOutcome, CharStep, CharedParams};
use crate::config::{Discovery, NodeConfig, Settings};
use crate::drive::{self, Finish, Limits};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::node_client::NodeClient;
use crate::replicas::{Replicas, Resolve, SystemResolver};
use crate::specfuse::{OnlineWeights, RoundOutcome, SpecFuseParams};

/// A configured node (static address); see [`crate::config::NodeConfig`] for every option.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Its name (for `single:NAME`, traces and errors).
    pub name: String,
    /// Its address, e.g. `http://10.0.0.7:50051`.
    pub url: String,
    /// Its default weight.
    pub weight: f64,
}

impl From<NodeSpec> for NodeConfig {
    fn from(n: NodeSpec) -> Self {
        NodeConfig {
            name: n.name,
            url: n.url,
            weight: n.weight,
            discovery: Discovery::Static,
            dns_refresh_ms: 5000,
            model_dir: None,
        }
    }
}

/// Most characters per answer.
pub const MAX_CHARS: u32 = 65_536;

/// Most stop strings per request.
pub const MAX_STOPS: usize = 16;

/// Whether `strategy` names one: `specfuse`, `chared` or `single:` a member of `nodes`.
pub fn is_strategy(strategy: &str, nodes: &[String]) -> bool {
    match strategy {
        "specfuse" | "chared" => true,
        s => s
            .strip_prefix("single:")
            .is_some_and(|n| nodes.iter().any(|m| m == n)),
    }
}

/// The sampling settings every API checks before any node is called (every node would refuse the
/// same values, and CharED, which samples in the coordinator, must refuse them too):
/// `Err((field, message))` names the field at fault.
pub fn check_sampling(s: &pb::Sampling) -> Result<(), (&'static str, String)> {
    if !(s.temperature.is_finite() && s.temperature >= 0.0) {
        return Err((
            "temperature",
            format!("temperature must be a finite number >= 0, got {}", s.temperature),
        ));
    }
    if let Some(p) = s.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(("top_p", format!("top_p must be in (0, 1], got {p}")));
    }
    if s.top_k == Some(0) {
        return Err(("top_k", "top_k must be at least 1 when set, got 0".into()));
    }
    Ok(())
}

/// The request limits every API checks: `Err((field, message))` names the field at fault.
pub fn check_limits(max_chars: u32, stop: &[String]) -> Result<(), (&'static str, String)> {
    if max_chars == 0 || max_chars > MAX_CHARS {
        return Err((
            "max_chars",
            format!("max_chars must be in 1..={MAX_CHARS}, got {max_chars}"),
        ));
    }
    if stop.len() > MAX_STOPS || stop.iter().any(String::is_empty) {
        return Err(("stop", format!("stop: at most {MAX_STOPS} non-empty strings")));
    }
    Ok(())
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let msg = e.to_string();
        match e {
            Error::InvalidParameter { .. } | Error::WeightCount { .. } | Error::NoNodes => {
                Status::invalid_argument(msg)
            }
            Error::Timeout { .. } => Status::deadline_exceeded(msg),
            Error::Cancelled => Status::cancelled(msg),
            Error::Node {
                code: code @ (tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted),
                ..
            } => Status::new(code, msg),
            Error::NoActiveNode
            | Error::NoCandidates
            | Error::NoVerifier { .. }
            | Error::NoDistribution { .. }
            | Error::NodesFailed { .. }
            | Error::Ejected { .. }
            | Error::Node { .. } => Status::unavailable(msg),
            Error::UnknownNode { .. } | Error::DraftsMismatch { .. } => Status::internal(msg),
        }
    }
}

/// The service: the members with their replicas, and the defaults.
pub struct Coordinator {
    nodes: Vec<(NodeConfig, Arc<Replicas>)>,
    /// Each member's ejection state.
    outliers: Vec<Arc<crate::outlier::Outlier>>,
    settings: Settings,
    requests: AtomicU64,
    metrics: Arc<Metrics>,
    /// The members' names, in configuration order (labels, traces, `single:NAME`).
    names: Vec<String>,
    /// One permit per request served at once (`max_concurrent_requests`).
    permits: Arc<tokio::sync::Semaphore>,
}

/// The span of one ensemble request; its fields are filled in as the request runs.
pub fn request_span(api: &'static str) -> tracing::Span {
    tracing::info_span!(
        "generate",
        api,
        strategy = Empty,
        max_chars = Empty,
        chars = Empty,
        steps = Empty,
        finish = Empty,
        code = Empty
    )
}

impl Coordinator {
    /// A coordinator over static `nodes`, each call bounded by `deadline`, other settings default.
    pub async fn new(nodes: Vec<NodeSpec>, deadline: Duration) -> Result<Self, Error> {
        let mut settings = Settings::new(nodes.into_iter().map(NodeConfig::from).collect());
        settings.deadline = deadline;
        Self::start(settings, Arc::new(SystemResolver)).await
    }

    /// A coordinator with `settings`; DNS members are resolved with `resolver` (first resolution
    /// here, then in the background).
    pub async fn start(settings: Settings, resolver: Arc<dyn Resolve>) -> Result<Self, Error> {
        settings.check()?;
        let tls = match &settings.node_tls {
            Some(t) => Some(t.config().map_err(|e| Error::InvalidParameter {
                name: "node_tls".into(),
                value: e,
                allowed: "readable PEM files: ca, and cert with key for mutual TLS",
            })?),
            None => None,
        };
        let mut nodes = Vec::with_capacity(settings.nodes.len());
        for n in &settings.nodes {
            let replicas = Replicas::start_with(n, settings.deadline, tls.clone(), resolver.clone()).await?;
            nodes.push((n.clone(), replicas));
        }
        let outliers = nodes
            .iter()
            .map(|_| {
                Arc::new(crate::outlier::Outlier::new(
                    settings.eject_after,
                    settings.eject_time,
                ))
            })
            .collect();
        Ok(Self {
            permits: Arc::new(tokio::sync::Semaphore::new(settings.max_concurrent_requests)),
            names: nodes.iter().map(|n| n.0.name.clone()).collect(),
            outliers,
            nodes,
            settings,
            requests: AtomicU64::new(0),
            metrics: Arc::new(Metrics::new()),
        })
    }

    /// The coordinator's metrics (served on `/metrics`).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The members' names, in configuration order.
    pub fn node_names(&self) -> &[String] {
        &self.names
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Every member: its name, replicas and ejection state.
    pub fn members(&self) -> impl Iterator<Item = (&str, &Arc<Replicas>, &Arc<crate::outlier::Outlier>)> {
        self.nodes
            .iter()
            .zip(&self.outliers)
            .map(|((cfg, replicas), o)| (cfg.name.as_str(), replicas, o))
    }

    /// Each member's name and whether it is up (`Err`: why not), in configuration order.
    pub fn member_status(&self) -> Vec<(String, Result<(), String>)> {
        self.members().map(|(n, _, o)| (n.to_owned(), o.up())).collect()
    }

    /// Whether at least `min_healthy_nodes` members are up.
    pub fn ready(&self) -> bool {
        self.members().filter(|m| m.2.up().is_ok()).count() >= self.settings.min_healthy_nodes
    }

    fn clients(&self, session: &str, prompt: &pb::Prompt) -> Vec<NodeClient> {
        self.nodes
            .iter()
            .zip(&self.outliers)
            .map(|((cfg, replicas), outlier)| {
                let mut c =
                    NodeClient::with_replicas(cfg.name.clone(), replicas.clone(), self.settings.deadline)
                        .retries(self.settings.retries)
                        .metrics(self.metrics.clone())
                        .outlier(outlier.clone());
                c.begin(session, prompt.clone());
                c
            })
            .collect()
    }

    fn weights(&self, given: &[f64]) -> Option<Vec<f64>> {
        Some(if given.is_empty() {
            self.nodes.iter().map(|n| n.0.weight).collect()
        } else {
            given.to_vec()
        })
    }
}

fn finish(f: Finish) -> pb::FinishReason {
    match f {
        Finish::Eos => pb::FinishReason::Eos,
        Finish::Length => pb::FinishReason::Length,
        Finish::Stop => pb::FinishReason::Stop,
    }
}

fn specfuse_params(
    defaults: &SpecFuseParams,
    o: Option<pb::SpecFuseOptions>,
    weights: Option<Vec<f64>>,
) -> SpecFuseParams {
    let o = o.unwrap_or_default();
    let mut p = SpecFuseParams {
        weights,
        ..defaults.clone()
    };
    if let Some(v) = o.segment_tokens {
        p.segment_tokens = v;
    }
    if let Some(v) = o.self_votes {
        p.self_votes = v;
    }
    if let Some(v) = o.exit {
        p.exit.enabled = v;
    }
    if let Some(v) = o.exit_delta {
        p.exit.delta = v;
    }
    if let Some(v) = o.exit_tau {
        p.exit.tau = v;
    }
    if let Some(v) = o.exit_warmup_rounds {
        p.exit.warmup_rounds = v;
    }
    if let Some(v) = o.min_active {
        p.exit.min_active = v as usize;
    }
    if let Some(lr) = o.online_weights_lr {
        p.online_weights = Some(OnlineWeights { lr });
    }
    if let Some(v) = o.string_prefix {
        p.string_prefix = v;
    }
    if let Some(v) = o.per_char {
        p.per_char = v;
    }
    if let Some(v) = o.gate {
        p.gate = Some(v);
    }
    p
}

fn chared_params(
    defaults: &CharedParams,
    o: Option<pb::CharEdOptions>,
    weights: Option<Vec<f64>>,
) -> CharedParams {
    let o = o.unwrap_or_default();
    let mut p = CharedParams {
        weights,
        ..defaults.clone()
    };
    if let Some(v) = o.temperature {
        p.temperature = v;
    }
    if let Some(v) = o.top_p {
        p.top_p = v;
    }
    if let Some(v) = o.seed {
        p.seed = v;
    }
    if let Some(v) = o.published {
        p.published = v;
    }
    if let Some(v) = o.draft_chars {
        p.draft_chars = v;
    }
    if let Some(v) = o.gate {
        p.gate = Some(v);
    }
    p
}

impl Coordinator {
    /// Runs one request; `on_round` / `on_char` see every step and return false to cancel it.
    pub async fn run(
        &self,
        r: pb::GenerateRequest,
        on_round: &mut (dyn FnMut(&RoundOutcome) -> bool + Send),
        on_char: &mut (dyn FnMut(&CharStep) -> bool + Send),
    ) -> Result<pb::GenerateResponse, Status> {
        self.run_in(request_span("library"), "library", r, on_round, on_char)
            .await
    }

    /// [`Coordinator::run`] within `span` (see [`request_span`]), counted under `api` in the metrics.
    pub async fn run_in(
        &self,
        span: tracing::Span,
        api: &str,
        r: pb::GenerateRequest,
        on_round: &mut (dyn FnMut(&RoundOutcome) -> bool + Send),
        on_char: &mut (dyn FnMut(&CharStep) -> bool + Send),
    ) -> Result<pb::GenerateResponse, Status> {
        let started = Instant::now();
        let strategy = if r.strategy.is_empty() {
            self.settings.default_strategy.clone()
        } else {
            r.strategy.clone()
        };
        let label = if is_strategy(&strategy, &self.names) {
            strategy.as_str()
        } else {
            "invalid"
        };
        let in_flight = self.metrics.request_started(label, api);
        span.record("strategy", label);
        span.record("max_chars", i64::from(r.max_chars));
        let names = &self.names;
        let metrics = &self.metrics;
        // (first text seen yet, when the previous step ended): shared by the two step callbacks.
        let clock = std::sync::Mutex::new((false, started));
        let step = |text: bool| -> Duration {
            let now = Instant::now();
            let Ok(mut c) = clock.lock() else {
                return Duration::ZERO;
            };
            if text && !c.0 {
                c.0 = true;
                metrics.first_token(label, now - started);
            }
            now - std::mem::replace(&mut c.1, now)
        };
        let out = {
            let single = label.starts_with("single:");
            let mut on_round = |o: &RoundOutcome| {
                let elapsed = step(!o.winner.text.is_empty());
                if single {
                    metrics.single_step();
                } else {
                    metrics.round(o, elapsed, names);
                }
                on_round(o)
            };
            let mut on_char = |c: &CharStep| {
                metrics.char_step(step(c.chosen != CharOutcome::Eos));
                on_char(c)
            };
            self.run_strategy(r, strategy.clone(), &mut on_round, &mut on_char)
                .instrument(span.clone())
                .await
        };
        let code = out.as_ref().map_or_else(|s| s.code(), |_| tonic::Code::Ok);
        let chars = out
            .as_ref()
            .map_or(0, |r| r.text.chars().count() + r.reasoning.chars().count());
        span.record("code", ensemble_proto::status_name(code));
        if let Ok(resp) = &out {
            span.record("chars", chars as i64);
            span.record("steps", i64::from(resp.steps));
            span.record("finish", resp.finish_reason().as_str_name());
            for n in &resp.failed_nodes {
                metrics.node_failed(n);
            }
        }
        in_flight.finish(code, chars);
        out
    }

    async fn run_strategy(
        &self,
        r: pb::GenerateRequest,
        strategy: String,
        on_round: &mut (dyn FnMut(&RoundOutcome) -> bool + Send),
        on_char: &mut (dyn FnMut(&CharStep) -> bool + Send),
    ) -> Result<pb::GenerateResponse, Status> {
        // Overload is refused before any work: the permit is held until the answer is complete.
        let _permit = self.permits.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "the coordinator is serving its limit of {} requests at once \
                 (max_concurrent_requests); retry after a short wait",
                self.settings.max_concurrent_requests
            ))
        })?;
        let prompt = r
            .prompt
            .filter(|p| p.kind.is_some())
            .ok_or_else(|| Status::invalid_argument("prompt is required: a conversation or a raw prompt"))?;
        self.settings
            .input
            .check_prompt(&prompt, "")
            .map_err(Status::invalid_argument)?;
        check_limits(r.max_chars, &r.stop).map_err(|(_, msg)| Status::invalid_argument(msg))?;
        if let Some(s) = &r.sampling {
            check_sampling(s).map_err(|(_, msg)| Status::invalid_argument(msg))?;
        }
        let limits = Limits {
            max_chars: r.max_chars as usize,
            stop: r.stop.clone(),
        };
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        let session = format!("ens-{}-{n}", std::process::id());
        let mut clients = self.clients(&session, &prompt);
        let sampling = r.sampling.unwrap_or_default();
        let name_of = |i: usize| self.nodes.get(i).map(|n| n.0.name.clone()).unwrap_or_default();
        let mut resp = match strategy.as_str() {
            "specfuse" => {
                let sf = r.specfuse.clone();
                let params = specfuse_params(
                    &self.settings.specfuse,
                    sf,
                    self.weights(&r.specfuse.unwrap_or_default().weights),
                );
                params.validate()?;
                let a = drive::specfuse(&mut clients, params, &limits, sampling, on_round).await?;
                pb::GenerateResponse {
                    text: a.text,
                    finish_reason: finish(a.finish) as i32,
                    strategy,
                    steps: a.rounds.len() as u32,
                    mean_active_nodes: a.mean_active,
                    exited_nodes: a.rounds.iter().flat_map(|o| o.exited()).map(name_of).collect(),
                    failed_nodes: a.failed.iter().map(|(i, _)| name_of(*i)).collect(),
                    reasoning: String::new(),
                    round_trips: a.round_trips as u32,
                    node_calls: 0,
                }
            }
            "chared" => {
                let co = r.chared.clone();
                let params = chared_params(
                    &self.settings.chared,
                    co,
                    self.weights(&r.chared.unwrap_or_default().weights),
                );
                params.validate()?;
                let a = drive::chared(&mut clients, params, &limits, on_char).await?;
                pb::GenerateResponse {
                    text: a.text,
                    finish_reason: finish(a.finish) as i32,
                    strategy,
                    steps: a.steps.len() as u32,
                    mean_active_nodes: 0.0,
                    exited_nodes: vec![],
                    failed_nodes: a.failed.iter().map(|(i, _)| name_of(*i)).collect(),
                    reasoning: String::new(),
                    round_trips: a.round_trips as u32,
                    node_calls: 0,
                }
            }
            s => {
                let Some(name) = s.strip_prefix("single:") else {
                    return Err(Status::invalid_argument(format!(
                        "unknown strategy {}: use \"specfuse\", \"chared\" or \"single:NAME\"",
                        ensemble_proto::limits::quote(s)
                    )));
                };
                let Some(i) = self.nodes.iter().position(|n| n.0.name == name) else {
                    let names: Vec<&str> = self.nodes.iter().map(|n| n.0.name.as_str()).collect();
                    return Err(Status::invalid_argument(format!(
                        "unknown node {}; configured: {names:?}",
                        ensemble_proto::limits::quote(name)
                    )));
                };
                let a = drive::single(&mut clients[i], i, &limits, sampling, on_round).await?;
                pb::GenerateResponse {
                    text: a.text,
                    finish_reason: finish(a.finish) as i32,
                    strategy,
                    steps: a.steps,
                    mean_active_nodes: 1.0,
                    exited_nodes: vec![],
                    failed_nodes: vec![],
                    reasoning: String::new(),
                    round_trips: a.steps,
                    node_calls: 0,
                }
            }
        };
        resp.node_calls = clients
            .iter()
            .map(|c| {
                let (p, s, n) = c.calls();
                (p + s + n) as u32
            })
            .sum();
        if let Some((reasoning, answer)) = ensemble_proto::reasoning::split(&resp.text) {
            (resp.reasoning, resp.text) = (reasoning.to_owned(), answer.to_owned());
        }
        Ok(resp)
    }
}

/// The gRPC face of a [`Coordinator`] (shared with the tasks that run streamed requests).
#[derive(Clone)]
pub struct EnsembleService(Arc<Coordinator>);

impl EnsembleService {
    /// Serves `coordinator`.
    pub fn new(coordinator: Coordinator) -> Self {
        Self(Arc::new(coordinator))
    }

    /// Serves a coordinator shared with other faces (the HTTP API).
    pub fn shared(coordinator: Arc<Coordinator>) -> Self {
        Self(coordinator)
    }
}

/// The request's span, a child of the caller's trace when its metadata carries one.
fn grpc_span<T>(req: &Request<T>) -> tracing::Span {
    let span = request_span("grpc");
    ensemble_proto::telemetry::set_parent(&span, req.metadata());
    span
}

#[tonic::async_trait]
impl Ensemble for EnsembleService {
    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let span = grpc_span(&req);
        let resp = self
            .0
            .run_in(span, "grpc", req.into_inner(), &mut |_| true, &mut |_| true)
            .await?;
        Ok(Response::new(resp))
    }

    type GenerateStreamStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::GenerateEvent, Status>> + Send>>;

    async fn generate_stream(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        // At most two events per step, and steps are bounded by max_chars: an unbounded channel cannot
        // outgrow the request, and the strategy never waits on a slow reader. A closed stream (client
        // gone) makes the next step's send fail, which cancels the request and frees node sessions.
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<pb::GenerateEvent, Status>>();
        let coordinator = self.0.clone();
        let span = grpc_span(&req);
        let r = req.into_inner();
        tokio::spawn(async move {
            let names = coordinator.node_names();
            let (tx_r, tx_c) = (tx.clone(), tx.clone());
            let mut on_round = move |o: &RoundOutcome| {
                let _ = tx_r.send(Ok(event(pb::generate_event::Event::Delta(o.winner.text.clone()))));
                tx_r.send(Ok(event(pb::generate_event::Event::Round(round_trace(o, names)))))
                    .is_ok()
            };
            let mut on_char = move |c: &CharStep| {
                if let CharOutcome::Char(ch) = c.chosen {
                    let _ = tx_c.send(Ok(event(pb::generate_event::Event::Delta(ch.to_string()))));
                }
                tx_c.send(Ok(event(pb::generate_event::Event::Char(char_trace(c, names)))))
                    .is_ok()
            };
            let out = coordinator
                .run_in(span, "grpc", r, &mut on_round, &mut on_char)
                .await;
            let _ = tx.send(out.map(|d| event(pb::generate_event::Event::Done(d))));
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        )))
    }

    async fn list_nodes(
        &self,
        _req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let calls = self.0.nodes.iter().map(|(spec, replicas)| {
            let replica = replicas.pick();
            let deadline = self.0.settings.deadline;
            async move {
                let Some(replica) = replica else {
                    return pb::NodeStatus {
                        name: spec.name.clone(),
                        url: spec.url.clone(),
                        weight: spec.weight,
                        healthy: false,
                        info: None,
                        error: "no replica: DNS gave no address".into(),
                    };
                };
                let mut client = pb::model_node_client::ModelNodeClient::new(replica.channel);
                let mut req = Request::new(pb::InfoRequest {});
                req.set_timeout(deadline);
                let r = tokio::time::timeout(deadline, client.info(req)).await;
                let (info, error) = match r {
                    Ok(Ok(i)) => (Some(i.into_inner()), String::new()),
                    Ok(Err(s)) => (None, format!("{:?}: {}", s.code(), s.message())),
                    Err(_) => (None, format!("no answer within {} ms", deadline.as_millis())),
                };
                pb::NodeStatus {
                    name: spec.name.clone(),
                    url: spec.url.clone(),
                    weight: spec.weight,
                    healthy: info.is_some(),
                    info,
                    error,
                }
            }
        });
        Ok(Response::new(pb::ListNodesResponse {
            nodes: futures::future::join_all(calls).await,
        }))
    }
}

fn event(e: pb::generate_event::Event) -> pb::GenerateEvent {
    pb::GenerateEvent { event: Some(e) }
}

fn round_trace(o: &RoundOutcome, names: &[String]) -> pb::RoundTrace {
    let name = |i: usize| names.get(i).cloned().unwrap_or_default();
    pb::RoundTrace {
        round: o.round,
        active: o.active.iter().map(|&i| name(i)).collect(),
        candidates: o
            .candidates
            .iter()
            .zip(&o.combined)
            .map(|(c, &score)| pb::CandidateTrace {
                text: c.text.clone(),
                proposers: c.proposers.iter().map(|&i| name(i)).collect(),
                score,
            })
            .collect(),
        verifiers: o
            .verifiers
            .iter()
            .map(|v| pb::VerifierTrace {
                node: name(v.node),
                mean_logprobs: v.scores.clone(),
                q: v.q.clone(),
            })
            .collect(),
        winner_node: name(o.winner.node),
        winner_text: o.winner.text.clone(),
        exited: o.exited().into_iter().map(name).collect(),
    }
}

fn char_trace(c: &CharStep, names: &[String]) -> pb::CharTrace {
    let text = |o: &CharOutcome| match o {
        CharOutcome::Char(ch) => ch.to_string(),
        CharOutcome::Eos => String::new(),
    };
    pb::CharTrace {
        round: c.round as u32,
        drafted: c.drafted,
        char: text(&c.chosen),
        eos: c.chosen == CharOutcome::Eos,
        prob: c.prob,
        alternatives: c
            .alternatives
            .iter()
            .map(|a| pb::CharAltTrace {
                char: text(&a.outcome),
                eos: a.outcome == CharOutcome::Eos,
                prob: a.prob,
            })
            .collect(),
        shares: c
            .shares
            .iter()
            .map(|s| pb::CharShareTrace {
                node: names.get(s.node).cloned().unwrap_or_default(),
                prob: s.prob,
                share: s.share,
            })
            .collect(),
    }
}
