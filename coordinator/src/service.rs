//! The `Ensemble` gRPC face of a [`Coordinator`]: unary and streamed `Generate` (a trace event per
//! [`Step`]), `ListNodes`, and the one mapping of the crate's [`Error`] to a gRPC status.

use std::pin::Pin;
use std::sync::Arc;

use ensemble_proto::v1 as pb;
use ensemble_proto::v1::ensemble_server::Ensemble;
use tonic::{Request, Response, Status};

pub use crate::core::{
    Coordinator, MAX_CHARS, MAX_STOPS, NodeSpec, check_limits, check_sampling, is_strategy, request_span,
    span_trace, stage_trace,
};
use crate::error::Error;
use crate::strategy::Step;
use crate::strategy::chared::{CharOutcome, CharStep};
use crate::strategy::specfuse::RoundOutcome;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let msg = e.to_string();
        match e {
            Error::InvalidParameter { .. }
            | Error::Invalid { .. }
            | Error::WeightCount { .. }
            | Error::NoNodes => Status::invalid_argument(msg),
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
            .run_in(span, "grpc", req.into_inner(), &mut |_| true)
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
            let steps = tx.clone();
            let mut on_step = move |s: Step<'_>| {
                if let Some(d) = s.delta().filter(|d| !d.is_empty() || matches!(s, Step::Round(_))) {
                    let _ = steps.send(Ok(event(pb::generate_event::Event::Delta(d.into_owned()))));
                }
                steps.send(Ok(event(step_trace(s, names)))).is_ok()
            };
            let out = coordinator.run_in(span, "grpc", r, &mut on_step).await;
            let _ = tx.send(out.map(|d| event(pb::generate_event::Event::Done(d))));
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        )))
    }

    async fn perplexity(
        &self,
        req: Request<pb::PerplexityRequest>,
    ) -> Result<Response<pb::PerplexityResponse>, Status> {
        let span = grpc_span(&req);
        let r = req.into_inner();
        let docs = perplexity_docs(r.documents, r.fit_weights)?;
        let p =
            tracing::Instrument::instrument(crate::perplexity::measure(&self.0, &docs, &mut |_| {}), span)
                .await?;
        Ok(Response::new(report(p, r.fit_weights).await?))
    }

    type PerplexityStreamStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::PerplexityEvent, Status>> + Send>>;

    async fn perplexity_stream(
        &self,
        req: Request<pb::PerplexityRequest>,
    ) -> Result<Response<Self::PerplexityStreamStream>, Status> {
        let span = grpc_span(&req);
        let r = req.into_inner();
        let docs = perplexity_docs(r.documents, r.fit_weights)?;
        // One event per document (bounded by the request) and the report: an unbounded channel cannot
        // outgrow the request. A client that leaves cancels the run (its node sessions are closed).
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<pb::PerplexityEvent, Status>>();
        let coordinator = self.0.clone();
        tokio::spawn(async move {
            let chars: Vec<u64> = docs.iter().map(|d| d.chars().count() as u64).collect();
            let total = chars.iter().sum();
            let progress = tx.clone();
            let mut on_doc = move |done: usize| {
                let _ = progress.send(Ok(pb::PerplexityEvent {
                    event: Some(pb::perplexity_event::Event::Progress(pb::PerplexityProgress {
                        documents_done: done as u64,
                        documents: chars.len() as u64,
                        chars_done: chars[..done].iter().sum(),
                        chars: total,
                    })),
                }));
            };
            let run = tracing::Instrument::instrument(
                crate::perplexity::measure(&coordinator, &docs, &mut on_doc),
                span,
            );
            tokio::select! {
                out = run => {
                    let done = match out {
                        Ok(p) => report(p, r.fit_weights).await,
                        Err(e) => Err(Status::from(e)),
                    };
                    let _ = tx.send(done.map(|d| pb::PerplexityEvent {
                        event: Some(pb::perplexity_event::Event::Done(d)),
                    }));
                }
                () = tx.closed() => {}
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        )))
    }

    async fn list_nodes(
        &self,
        _req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let calls = self.0.member_configs().map(|(spec, replicas)| {
            let replica = replicas.pick();
            let deadline = self.0.settings().deadline;
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

/// A step as a stream event.
pub fn step_trace(s: Step<'_>, names: &[String]) -> pb::generate_event::Event {
    match s {
        Step::Round(o) => pb::generate_event::Event::Round(round_trace(o, names)),
        Step::Char(c) => pb::generate_event::Event::Char(char_trace(c, names)),
        Step::Span(sp) => pb::generate_event::Event::Span(span_trace(sp, names)),
        Step::Stage(st) => pb::generate_event::Event::Stage(stage_trace(st, names)),
    }
}

/// The non-empty documents of a perplexity request, or why it cannot run.
fn perplexity_docs(documents: Vec<String>, fit_weights: bool) -> Result<Vec<String>, Status> {
    let docs: Vec<String> = documents.into_iter().filter(|d| !d.is_empty()).collect();
    if docs.is_empty() {
        return Err(Status::invalid_argument(
            "documents: give at least one non-empty document",
        ));
    }
    if fit_weights && docs.len() < 2 {
        return Err(Status::invalid_argument(
            "fit_weights needs at least two non-empty documents: the weights are fitted on the even-numbered \
             ones and reported on the odd-numbered ones",
        ));
    }
    Ok(docs)
}

/// The report of a measured text (fitting the weights is CPU work of up to seconds: off the async
/// workers).
async fn report(p: crate::perplexity::Perplexity, fit: bool) -> Result<pb::PerplexityResponse, Status> {
    tokio::task::spawn_blocking(move || p.report(fit))
        .await
        .map_err(|e| Status::internal(format!("the perplexity report failed: {e}")))
}
