//! The strategy layer: every ensemble strategy behind one interface.
//!
//! A strategy is one module here holding its synchronous state machine (no networking, unit-tested
//! on hand-computed examples), its async driver (the parallel fan-out to the nodes, failures, the
//! broadcast of accepted text) and its registration: a [`Strategy`] that checks a request's options
//! against the members and the defaults **before any node is called** and returns a [`Run`]. Every
//! driver reports what it decides as [`Step`] events, the one type that traces, metrics, streaming
//! and the HTTP API read. The [`crate::core::Coordinator`] finds the strategy by name in
//! [`registry`], gives it the request's nodes and limits, and maps its [`Answer`] to the wire.
//!
//! Adding a strategy touches its own module, one line in [`registry`], its options message in
//! `ensemble.proto` (with the mapping in its module) and the docs.
//!
//! - [`specfuse`]: SpecFuse propose / verify rounds with model exit (`specfuse/run.rs`: driver).
//! - [`chared`]: CharED per-character mixing, speculative rounds (`chared/run.rs`,
//!   `chared/speculative.rs`).
//! - [`single`]: `single:NAME`, one member alone (the baseline).
//! - [`colm`]: Co-LLM learned deferral across tokenizers.
//! - [`pipeline`]: FSLM stacked pipelines of members with role prompts.

use std::borrow::Cow;

use ensemble_proto::v1 as pb;
use futures::future::{BoxFuture, join_all};

use crate::config::Settings;
use crate::error::{Error, Result};
use crate::node_client::NodeClient;

pub mod chared;
pub mod colm;
pub mod pipeline;
pub mod single;
pub mod specfuse;

use chared::{CharOutcome, CharStep};
use specfuse::RoundOutcome;

/// Every strategy, by name: the one registration line per strategy.
pub fn registry() -> &'static [&'static dyn Strategy] {
    &[
        &specfuse::SpecFuseStrategy,
        &chared::CharEdStrategy,
        &single::Single,
        &colm::CoLlmStrategy,
        &pipeline::Pipeline,
    ]
}

/// The strategy `name` asks for, with the argument of a family (`single:NAME` → `NAME`).
pub fn find(name: &str) -> Option<(&'static dyn Strategy, Option<&str>)> {
    registry().iter().find_map(|s| match s.name().strip_suffix(':') {
        Some(family) => name
            .strip_prefix(family)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(|arg| (*s, Some(arg))),
        None => (s.name() == name).then_some((*s, None)),
    })
}

/// The names a client may ask for, as a list for error messages (`single:` families as `single:NAME`).
pub fn names() -> Vec<String> {
    registry()
        .iter()
        .map(|s| match s.name().strip_suffix(':') {
            Some(f) => format!("{f}:NAME"),
            None => s.name().to_owned(),
        })
        .collect()
}

/// One ensemble strategy.
pub trait Strategy: Send + Sync {
    /// The name a request gives (`specfuse`), or a family's prefix ending in `:` (`single:`).
    fn name(&self) -> &'static str;
    /// Whether it plans from the members' `Info` (the core fetches it first for members the health
    /// probe has no answer from).
    fn needs_info(&self) -> bool {
        false
    }
    /// Checks the request's options against the members and the defaults and builds its run. Errors
    /// here are the client's (`INVALID_ARGUMENT`, naming the field) and come before any node call.
    fn plan(&self, request: &Request<'_>) -> Result<Box<dyn Run>>;
}

/// A checked request, ready to run.
pub trait Run: Send {
    /// Runs it over `ctx.nodes` (every member in configuration order, each begun with the request's
    /// session and prompt); frees their sessions whatever happens.
    fn run<'a>(self: Box<Self>, ctx: Ctx<'a>) -> BoxFuture<'a, Result<Answer>>;
}

/// A member as a strategy sees it when planning.
#[derive(Debug, Clone)]
pub struct Member {
    /// Its configured name.
    pub name: String,
    /// Its configured weight.
    pub weight: f64,
    /// Its last `Info` (from the health probe); `None` while it has not answered one.
    pub info: Option<pb::InfoResponse>,
}

/// What a strategy plans from.
pub struct Request<'a> {
    /// The family argument (`single:NAME` → `NAME`).
    pub arg: Option<&'a str>,
    /// The request as it came.
    pub request: &'a pb::GenerateRequest,
    /// The coordinator's defaults.
    pub settings: &'a Settings,
    /// The members, in configuration order.
    pub members: &'a [Member],
}

impl Request<'_> {
    /// The member called `name`, or an `INVALID_ARGUMENT` naming `field` and the members.
    pub fn member(&self, field: &str, name: &str) -> Result<usize> {
        self.members.iter().position(|m| m.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.members.iter().map(|m| m.name.as_str()).collect();
            Error::bad_field(
                field,
                format!(
                    "unknown node {}; configured: {names:?}",
                    ensemble_proto::limits::quote(name)
                ),
            )
        })
    }

    /// The request's weights, or the members' configured ones.
    pub fn weights(&self, given: &[f64]) -> Option<Vec<f64>> {
        Some(if given.is_empty() {
            self.members.iter().map(|m| m.weight).collect()
        } else {
            given.to_vec()
        })
    }

    /// The request's sampling settings (default: greedy).
    pub fn sampling(&self) -> pb::Sampling {
        self.request.sampling.unwrap_or_default()
    }
}

/// What a run works with.
pub struct Ctx<'a> {
    /// Every member's client for this request, in configuration order.
    pub nodes: &'a mut [NodeClient],
    /// When the answer stops.
    pub limits: &'a Limits,
    /// Sees every step; returns false to cancel the request.
    pub observe: &'a mut (dyn FnMut(Step<'_>) -> bool + Send),
}

/// One step of a running request, as every face sees it (traces, metrics, streams, HTTP).
#[derive(Debug, Clone, Copy)]
pub enum Step<'a> {
    /// A SpecFuse round, or a `single:NAME` segment (a round with one candidate).
    Round(&'a RoundOutcome),
    /// A CharED character.
    Char(&'a CharStep),
    /// A span of the answer one member wrote (Co-LLM, the last stage of a pipeline).
    Span(&'a SpanStep),
    /// A finished pipeline stage (FSLM); its text is not the answer unless it is the last stage.
    Stage(&'a StageStep),
}

impl Step<'_> {
    /// The text this step appended to the answer (a stream's delta).
    pub fn delta(&self) -> Option<Cow<'_, str>> {
        match self {
            Step::Round(o) => Some(Cow::Borrowed(o.winner.text.as_str())),
            Step::Char(c) => match c.chosen {
                CharOutcome::Char(ch) => Some(Cow::Owned(ch.to_string())),
                CharOutcome::Eos => None,
            },
            Step::Span(s) => Some(Cow::Borrowed(s.text.as_str())),
            Step::Stage(_) => None,
        }
    }
}

/// A span of the answer one member wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanStep {
    /// The member (index in configuration order).
    pub node: usize,
    /// The text it added to the answer.
    pub text: String,
    /// Co-LLM: whether the member is an assistant the base deferred to.
    pub deferred: bool,
    /// Co-LLM: the base's deferral probability where it handed over (0 for the base's own spans).
    pub defer_prob: f64,
    /// Co-LLM: the base's deferral probability at each token of its span (empty otherwise).
    pub defer_probs: Vec<f32>,
}

/// One finished FSLM stage.
#[derive(Debug, Clone, PartialEq)]
pub struct StageStep {
    /// The stage, from 0.
    pub stage: usize,
    /// Its name.
    pub name: String,
    /// The member that ran it.
    pub node: usize,
    /// The prompt it was given (its role template, filled in).
    pub prompt: String,
    /// What it wrote.
    pub text: String,
    /// Whether the configured fallback member ran it because its own member failed.
    pub fallback: bool,
}

/// What a finished request produced, whatever the strategy.
#[derive(Debug)]
pub struct Answer {
    /// The answer.
    pub text: String,
    /// Why it ended.
    pub finish: Finish,
    /// SpecFuse rounds, CharED characters, Co-LLM spans, single segments or pipeline stages.
    pub steps: u32,
    /// Mean active nodes per step (SpecFuse; 1 for single; 0 otherwise).
    pub mean_active: f64,
    /// Members that left by SpecFuse's exit rule.
    pub exited: Vec<usize>,
    /// Members that failed during the request, with the error.
    pub failed: Vec<(usize, Error)>,
    /// Waves of node calls that ran one after another.
    pub round_trips: u64,
    /// Co-LLM: the spans, who wrote which.
    pub spans: Vec<SpanStep>,
    /// FSLM: every stage's text.
    pub stages: Vec<StageStep>,
}

impl Answer {
    /// An answer with `text` and `finish`, every count zero.
    pub fn new(text: String, finish: Finish) -> Self {
        Self {
            text,
            finish,
            steps: 0,
            mean_active: 0.0,
            exited: vec![],
            failed: vec![],
            round_trips: 0,
            spans: vec![],
            stages: vec![],
        }
    }
}

/// When the answer stops.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most characters in the answer.
    pub max_chars: usize,
    /// The answer ends before the first of these.
    pub stop: Vec<String>,
}

/// Why the answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A winning draft ended with EOS or a node's stop string.
    Eos,
    /// `max_chars` reached.
    Length,
    /// A stop string appeared in the answer.
    Stop,
}

/// Frees every node's session, in parallel (each close waits at most
/// [`crate::node_client::CLOSE_WAIT`]; a hung node's close goes on in the background).
pub async fn close_all(nodes: &mut [NodeClient]) {
    join_all(nodes.iter_mut().map(NodeClient::close)).await;
}

/// Whether `e` says the request ran out of nodes.
fn out_of_nodes(e: &Error) -> bool {
    matches!(
        e,
        Error::NoActiveNode | Error::NoCandidates | Error::NoVerifier { .. } | Error::NoDistribution { .. }
    )
}

/// Whether a node left because its context is full (the answer reached its context limit).
pub fn context_full(e: &Error) -> bool {
    matches!(e, Error::Node { code: tonic::Code::InvalidArgument, message, .. } if message.starts_with("context too long"))
}

/// An answer that ran every node out of context ends with `Length` and the text so far, not an
/// error.
pub fn full_is_length(finish: Result<Finish>, answer: &str, failed: &[(usize, Error)]) -> Result<Finish> {
    match finish {
        Err(e)
            if out_of_nodes(&e)
                && !answer.is_empty()
                && !failed.is_empty()
                && failed.iter().all(|(_, f)| context_full(f)) =>
        {
            Ok(Finish::Length)
        }
        other => other,
    }
}

/// What a request ends with when its nodes are gone: the nodes' own refusal when every node that
/// failed refused the request for the same reason that is the client's to fix (`INVALID_ARGUMENT`,
/// `RESOURCE_EXHAUSTED`: retrying elsewhere cannot help), else `UNAVAILABLE` naming every failed
/// node and its cause. Other errors pass through.
pub fn verdict(e: Error, failed: &[(usize, Error)]) -> Error {
    if !out_of_nodes(&e) || failed.is_empty() {
        return e;
    }
    let code_of = |f: &Error| match f {
        Error::Node { code, .. } => Some(*code),
        _ => None,
    };
    let first = code_of(&failed[0].1);
    let clients = matches!(
        first,
        Some(tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted)
    );
    if clients && failed.iter().all(|(_, f)| code_of(f) == first) {
        return failed[0].1.clone();
    }
    let causes: Vec<String> = failed.iter().map(|(_, f)| f.to_string()).collect();
    Error::NodesFailed {
        reason: e.to_string(),
        causes: causes.join("; "),
    }
}

/// Appends `text` to `answer` and applies the limits: the answer's end, if it ended (`ends`: the
/// text ended with the writer's EOS or stop string).
pub fn append(answer: &mut String, text: &str, ends: bool, limits: &Limits) -> Option<Finish> {
    answer.push_str(text);
    if let Some(cut) = limits.stop.iter().filter_map(|s| answer.find(s.as_str())).min() {
        answer.truncate(cut);
        return Some(Finish::Stop);
    }
    if let Some((cut, _)) = answer.char_indices().nth(limits.max_chars) {
        answer.truncate(cut);
        return Some(Finish::Length);
    }
    if ends {
        return Some(Finish::Eos);
    }
    (answer.chars().count() >= limits.max_chars).then_some(Finish::Length)
}
