//! The core [`Coordinator`], apart from its faces (gRPC in `service.rs`, HTTP in `http.rs`): the
//! members (replicas, ejection state, last `Info`), the checks every request passes, and the run of
//! one request: find the strategy in the [`strategy::registry`], let it check its options, give every
//! member a [`NodeClient`] for the request's session, run it, and turn its [`strategy::Answer`] into a
//! `GenerateResponse`. Every step goes to the metrics and to the face's observer as a [`Step`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ensemble_proto::v1 as pb;
use tonic::Status;
use tracing::Instrument as _;
use tracing::field::Empty;

use crate::config::{Discovery, NodeConfig, Settings};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::node_client::NodeClient;
use crate::replicas::{Replicas, Resolve, SystemResolver};
use crate::strategy::{self, Ctx, Finish, Limits, Member, SpanStep, StageStep, Step};

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
            node_args: vec![],
        }
    }
}

/// Most characters per answer.
pub const MAX_CHARS: u32 = 65_536;

/// Most stop strings per request.
pub const MAX_STOPS: usize = 16;

/// Whether `strategy` names one: a registered strategy, or `single:` a member of `nodes`.
pub fn is_strategy(strategy: &str, nodes: &[String]) -> bool {
    match strategy::find(strategy) {
        Some((_, Some(member))) => nodes.iter().any(|m| m == member),
        Some((_, None)) => true,
        None => false,
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

/// The coordinator: the members with their replicas, and the defaults.
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
    /// Each member's last `Info` (the health probe's), which strategies plan from.
    infos: Vec<std::sync::RwLock<Option<pb::InfoResponse>>>,
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
            infos: nodes.iter().map(|_| std::sync::RwLock::new(None)).collect(),
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

    /// Every member's configuration and replicas, in configuration order.
    pub fn member_configs(&self) -> impl Iterator<Item = (&NodeConfig, &Arc<Replicas>)> {
        self.nodes.iter().map(|(c, r)| (c, r))
    }

    /// Each member's name and whether it is up (`Err`: why not), in configuration order.
    pub fn member_status(&self) -> Vec<(String, Result<(), String>)> {
        self.members().map(|(n, _, o)| (n.to_owned(), o.up())).collect()
    }

    /// Whether at least `min_healthy_nodes` members are up.
    pub fn ready(&self) -> bool {
        self.members().filter(|m| m.2.up().is_ok()).count() >= self.settings.min_healthy_nodes
    }

    /// Records a member's `Info` (the health probe's answer), which strategies plan from.
    pub fn set_info(&self, member: usize, info: pb::InfoResponse) {
        if let Some(slot) = self.infos.get(member)
            && let Ok(mut s) = slot.write()
        {
            *s = Some(info);
        }
    }

    /// The members as strategies see them when planning.
    fn planning_members(&self) -> Vec<Member> {
        self.nodes
            .iter()
            .zip(&self.infos)
            .map(|((cfg, _), info)| Member {
                name: cfg.name.clone(),
                weight: cfg.weight,
                info: info.read().ok().and_then(|i| i.clone()),
            })
            .collect()
    }

    /// Asks every member without a recorded `Info` for one, in parallel (each bounded by the
    /// deadline, at most 2 s); a member that does not answer stays without one.
    async fn fetch_missing_info(&self) {
        let timeout = self.settings.deadline.min(Duration::from_secs(2));
        let asks = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, (_, replicas))| async move {
                let known = self.infos[i].read().map(|s| s.is_some()).unwrap_or(false);
                if !known && let Ok(info) = crate::probe::probe_member(replicas, timeout).await {
                    self.set_info(i, info);
                }
            });
        futures::future::join_all(asks).await;
    }

    pub(crate) fn clients(
        &self,
        session: &str,
        prompt: &pb::Prompt,
        rtd_lambda: Option<f64>,
    ) -> Vec<NodeClient> {
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
                c.set_rtd_lambda(rtd_lambda);
                c
            })
            .collect()
    }
}

fn finish(f: Finish) -> pb::FinishReason {
    match f {
        Finish::Eos => pb::FinishReason::Eos,
        Finish::Length => pb::FinishReason::Length,
        Finish::Stop => pb::FinishReason::Stop,
    }
}

impl Coordinator {
    /// Runs one request; `on_step` sees every step and returns false to cancel it.
    pub async fn run(
        &self,
        r: pb::GenerateRequest,
        on_step: &mut (dyn FnMut(Step<'_>) -> bool + Send),
    ) -> Result<pb::GenerateResponse, Status> {
        self.run_in(request_span("library"), "library", r, on_step).await
    }

    /// [`Coordinator::run`] within `span` (see [`request_span`]), counted under `api` in the metrics.
    pub async fn run_in(
        &self,
        span: tracing::Span,
        api: &str,
        r: pb::GenerateRequest,
        on_step: &mut (dyn FnMut(Step<'_>) -> bool + Send),
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
        // Whether text was seen yet, and when the previous step ended.
        let (mut first, mut last) = (false, started);
        let single = label.starts_with("single:");
        let colm = label == "colm";
        let mut observe = |s: Step<'_>| {
            let now = Instant::now();
            let elapsed = now - std::mem::replace(&mut last, now);
            if !first && s.delta().is_some_and(|d| !d.is_empty()) {
                first = true;
                metrics.first_token(label, now - started);
            }
            match s {
                Step::Round(_) if single => metrics.single_step(),
                Step::Round(o) => metrics.round(o, elapsed, names),
                Step::Char(_) => metrics.char_step(elapsed),
                Step::Span(sp) if colm => metrics.span(sp.deferred, sp.text.chars().count()),
                Step::Span(_) => {}
                Step::Stage(st) => metrics.stage(st.stage, elapsed),
            }
            on_step(s)
        };
        let out = self
            .run_strategy(r, strategy.clone(), &mut observe)
            .instrument(span.clone())
            .await;
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
        observe: &mut (dyn FnMut(Step<'_>) -> bool + Send),
    ) -> Result<pb::GenerateResponse, Status> {
        // Overload is refused before any work: the permit is held until the answer is complete.
        let _permit = self.permits.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "the coordinator is serving its limit of {} requests at once \
                 (max_concurrent_requests); retry after a short wait",
                self.settings.max_concurrent_requests
            ))
        })?;
        let prompt =
            r.prompt.clone().filter(|p| p.kind.is_some()).ok_or_else(|| {
                Status::invalid_argument("prompt is required: a conversation or a raw prompt")
            })?;
        self.settings
            .input
            .check_prompt(&prompt, "")
            .map_err(Status::invalid_argument)?;
        check_limits(r.max_chars, &r.stop).map_err(|(_, msg)| Status::invalid_argument(msg))?;
        if let Some(s) = &r.sampling {
            check_sampling(s).map_err(|(_, msg)| Status::invalid_argument(msg))?;
        }
        if let Some(l) = r.rtd_lambda
            && !(0.0..1.0).contains(&l)
        {
            return Err(Status::invalid_argument(format!(
                "rtd_lambda must be in [0, 1), got {l}"
            )));
        }
        let Some((found, arg)) = strategy::find(&strategy) else {
            return Err(Status::invalid_argument(format!(
                "unknown strategy {}: use one of {}",
                ensemble_proto::limits::quote(&strategy),
                strategy::names().join(", ")
            )));
        };
        // The strategy checks its options before any node is called (one that plans from the
        // members' `Info` first asks the members the health probe has no answer from yet).
        if found.needs_info() {
            self.fetch_missing_info().await;
        }
        let members = self.planning_members();
        let run = found.plan(&strategy::Request {
            arg,
            request: &r,
            settings: &self.settings,
            members: &members,
        })?;
        let limits = Limits {
            max_chars: r.max_chars as usize,
            stop: r.stop.clone(),
        };
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        let session = format!("ens-{}-{n}", std::process::id());
        let mut clients = self.clients(&session, &prompt, r.rtd_lambda);
        let a = run
            .run(Ctx {
                nodes: &mut clients,
                limits: &limits,
                observe,
            })
            .await?;
        let name_of = |i: usize| self.names.get(i).cloned().unwrap_or_default();
        let mut resp = pb::GenerateResponse {
            text: a.text,
            finish_reason: finish(a.finish) as i32,
            strategy,
            steps: a.steps,
            mean_active_nodes: a.mean_active,
            exited_nodes: a.exited.iter().copied().map(name_of).collect(),
            failed_nodes: a.failed.iter().map(|(i, _)| name_of(*i)).collect(),
            reasoning: String::new(),
            round_trips: a.round_trips as u32,
            node_calls: clients
                .iter()
                .map(|c| {
                    let (p, s, n) = c.calls();
                    (p + s + n) as u32
                })
                .sum(),
            deferrals: a.spans.iter().filter(|s| s.deferred).count() as u32,
            spans: a.spans.iter().map(|s| span_trace(s, &self.names)).collect(),
            stages: a.stages.iter().map(|s| stage_trace(s, &self.names)).collect(),
        };
        if let Some((reasoning, answer)) = ensemble_proto::reasoning::split(&resp.text) {
            (resp.reasoning, resp.text) = (reasoning.to_owned(), answer.to_owned());
        }
        Ok(resp)
    }
}

/// A Co-LLM span on the wire.
pub fn span_trace(s: &SpanStep, names: &[String]) -> pb::SpanTrace {
    pb::SpanTrace {
        node: names.get(s.node).cloned().unwrap_or_default(),
        text: s.text.clone(),
        deferred: s.deferred,
        defer_prob: s.defer_prob,
        defer_probs: s.defer_probs.clone(),
    }
}

/// A pipeline stage on the wire.
pub fn stage_trace(s: &StageStep, names: &[String]) -> pb::StageTrace {
    pb::StageTrace {
        stage: s.stage as u32,
        name: s.name.clone(),
        node: names.get(s.node).cloned().unwrap_or_default(),
        prompt: s.prompt.clone(),
        text: s.text.clone(),
        fallback: s.fallback,
    }
}
