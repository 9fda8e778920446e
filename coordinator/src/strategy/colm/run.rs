//! Co-LLM's async edge: the request's `CoLlmOptions` over the `[colm]` defaults, checked against the
//! base's deferral head ([`CoLlmStrategy`]), and the driver: one call at a time (the base, or the
//! assistant it deferred to), each span broadcast to every member's context. Each call is one span
//! (`colm_turn`) that parents the node call.

use ensemble_proto::v1 as pb;
use futures::future::BoxFuture;
use tracing::Instrument as _;

use super::{Action, BaseTurn, CoLlm, CoLlmParams, Handoff, Plan};
use crate::error::{Error, Result};
use crate::strategy::{
    Answer, Ctx, Finish, Request, Run, SpanStep, Step, Strategy, append, close_all, context_full,
};

/// `colm`.
pub struct CoLlmStrategy;

impl Strategy for CoLlmStrategy {
    fn name(&self) -> &'static str {
        "colm"
    }

    fn needs_info(&self) -> bool {
        true
    }

    fn plan(&self, r: &Request<'_>) -> Result<Box<dyn Run>> {
        let p = params(&r.settings.colm, r.request.colm.clone())?;
        Ok(Box::new(CoLlmRun {
            plan: plan(r, &p)?,
            sampling: r.sampling(),
        }))
    }
}

/// The request's options over the defaults.
pub fn params(defaults: &CoLlmParams, o: Option<pb::CoLlmOptions>) -> Result<CoLlmParams> {
    let o = o.unwrap_or_default();
    let mut p = defaults.clone();
    if let Some(b) = o.base {
        p.base = Some(b);
    }
    if !o.assistants.is_empty() {
        p.assistants = o.assistants;
    }
    if let Some(e) = o.eta {
        p.eta = Some(e);
    }
    if let Some(h) = o.handoff {
        p.handoff = Handoff::parse(&h).ok_or_else(|| {
            Error::bad_field(
                "colm.handoff",
                format!(
                    "must be \"token\" or \"word\", got {}",
                    ensemble_proto::limits::quote(&h)
                ),
            )
        })?;
    }
    if let Some(s) = o.segment_tokens {
        p.segment_tokens = s;
    }
    p.validate()?;
    Ok(p)
}

/// Checks the members: a base with a deferral head, assistants it has heads for.
fn plan(r: &Request<'_>, p: &CoLlmParams) -> Result<Plan> {
    let head_of = |i: usize| r.members[i].info.as_ref().and_then(|i| i.deferral_head.clone());
    let base = match &p.base {
        Some(b) => r.member("colm.base", b)?,
        None => (0..r.members.len())
            .find(|&i| head_of(i).is_some())
            .ok_or_else(|| {
                Error::bad_field(
                    "colm.base",
                    "no member's node has a deferral head: name the base, and start its node with \
                 --deferral-head FILE (`ensemble-train deferral` writes one)",
                )
            })?,
    };
    let name = &r.members[base].name;
    let Some(head) = head_of(base) else {
        if r.members[base].info.is_none() {
            return Err(Error::Node {
                node: name.clone(),
                code: tonic::Code::Unavailable,
                message: "the base has not answered Info yet, so its deferral head is unknown".into(),
            });
        }
        return Err(Error::bad_field(
            "colm.base",
            format!(
                "member {} has no deferral head: start its node with --deferral-head FILE \
                 (`ensemble-train deferral` writes one)",
                ensemble_proto::limits::quote(name)
            ),
        ));
    };
    for a in &p.assistants {
        let i = r.member("colm.assistants", a)?;
        if i == base {
            return Err(Error::bad_field(
                "colm.assistants",
                format!(
                    "{} is the base; an assistant must be another member",
                    ensemble_proto::limits::quote(a)
                ),
            ));
        }
        if !head.assistants.contains(a) {
            return Err(Error::bad_field(
                "colm.assistants",
                format!(
                    "the deferral head of {name} has no head for {}; it has heads for {:?}",
                    ensemble_proto::limits::quote(a),
                    head.assistants
                ),
            ));
        }
    }
    let heads: Vec<Option<usize>> = head
        .assistants
        .iter()
        .map(|a| {
            let allowed = p.assistants.is_empty() || p.assistants.contains(a);
            let i = r.members.iter().position(|m| &m.name == a)?;
            (allowed && i != base).then_some(i)
        })
        .collect();
    if heads.iter().all(Option::is_none) {
        return Err(Error::bad_field(
            "colm.assistants",
            format!(
                "the deferral head of {name} defers to {:?}, none of which is another configured member",
                head.assistants
            ),
        ));
    }
    let eta = p.eta.unwrap_or(if head.eta > 0.0 && head.eta < 1.0 {
        head.eta
    } else {
        0.5
    });
    Ok(Plan {
        base,
        heads,
        eta,
        handoff: p.handoff,
        segment_tokens: p.segment_tokens,
        word_tokens: p.word_tokens,
    })
}

struct CoLlmRun {
    plan: Plan,
    sampling: pb::Sampling,
}

impl Run for CoLlmRun {
    fn run<'a>(self: Box<Self>, ctx: Ctx<'a>) -> BoxFuture<'a, Result<Answer>> {
        Box::pin(async move {
            let Ctx {
                nodes,
                limits,
                observe,
            } = ctx;
            let mut co = CoLlm::new(self.plan);
            let base = co.plan().base;
            let mut answer = String::new();
            let mut spans: Vec<SpanStep> = Vec::new();
            let mut failed = Vec::new();
            let mut calls = 0u64;
            let finish: Result<Finish> = async {
                loop {
                    calls += 1;
                    let action = co.next();
                    let span = tracing::info_span!("colm_turn", turn = calls as i64, action = ?action);
                    let (step, ends) = match action {
                        Action::Base {
                            max_tokens,
                            threshold,
                        } => {
                            let r = nodes[base]
                                .propose_deferring(max_tokens, &limits.stop, self.sampling, threshold)
                                .instrument(span)
                                .await;
                            let p = match r {
                                Ok(p) => p,
                                Err(e) if context_full(&e) && !answer.is_empty() => {
                                    return Ok(Finish::Length);
                                }
                                Err(e) => return Err(e),
                            };
                            let reason = p.finish_reason();
                            let deferred = reason == pb::FinishReason::Defer;
                            let ends = matches!(reason, pb::FinishReason::Eos | pb::FinishReason::Stop);
                            // An empty LENGTH segment: the base's context is full (the answer ends).
                            let full = reason == pb::FinishReason::Length && p.text.is_empty();
                            let out = co.base_wrote(BaseTurn {
                                text: p.text,
                                ends,
                                deferred,
                                head_probs: p.defer_head_probs,
                                probs: p.defer_probs,
                            });
                            if full {
                                return Ok(Finish::Length);
                            }
                            out
                        }
                        Action::Assistant { node, max_tokens, .. } => {
                            let r = nodes[node]
                                .propose(max_tokens, &limits.stop, self.sampling)
                                .instrument(span)
                                .await;
                            match r {
                                Ok(p) => {
                                    let ends = matches!(
                                        p.finish_reason(),
                                        pb::FinishReason::Eos | pb::FinishReason::Stop
                                    );
                                    co.assistant_wrote(&p.text, ends)
                                }
                                // The request goes on without it: the base writes the token itself.
                                Err(e) => {
                                    failed.push((node, e));
                                    co.assistant_failed();
                                    continue;
                                }
                            }
                        }
                    };
                    let before = answer.len();
                    let end = append(&mut answer, &step.text, ends, limits);
                    let kept = answer.get(before..).unwrap_or_default().to_owned();
                    for n in nodes.iter_mut() {
                        n.accept(&kept);
                    }
                    let step = SpanStep { text: kept, ..step };
                    if !observe(Step::Span(&step)) {
                        return Err(Error::Cancelled);
                    }
                    spans.push(step);
                    if let Some(f) = end {
                        return Ok(f);
                    }
                }
            }
            .await;
            close_all(nodes).await;
            let finish = finish?;
            Ok(Answer {
                steps: spans.len() as u32,
                mean_active: 0.0,
                failed,
                round_trips: calls,
                spans,
                ..Answer::new(answer, finish)
            })
        })
    }
}
