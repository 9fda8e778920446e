//! `single:NAME`: one member writes the whole answer alone (the baseline every ensemble is measured
//! against), in segments reported as one-candidate rounds so that streams get text deltas.

use ensemble_proto::v1 as pb;
use futures::future::BoxFuture;

use crate::error::{Error, Result};
use crate::node_client::NodeClient;
use crate::strategy::specfuse::{Candidate, RoundOutcome, Winner};
use crate::strategy::{Answer, Ctx, Finish, Limits, Request, Run, Step, Strategy, context_full};

/// `single:NAME`.
pub struct Single;

impl Strategy for Single {
    fn name(&self) -> &'static str {
        "single:"
    }

    fn plan(&self, r: &Request<'_>) -> Result<Box<dyn Run>> {
        let index = r.member("strategy", r.arg.unwrap_or_default())?;
        Ok(Box::new(SingleRun {
            index,
            sampling: r.sampling(),
        }))
    }
}

struct SingleRun {
    index: usize,
    sampling: pb::Sampling,
}

impl Run for SingleRun {
    fn run<'a>(self: Box<Self>, ctx: Ctx<'a>) -> BoxFuture<'a, Result<Answer>> {
        Box::pin(async move {
            let observe = ctx.observe;
            let node = ctx.nodes.get_mut(self.index).ok_or(Error::UnknownNode {
                node: self.index,
                nodes: 0,
            })?;
            let a = single(node, self.index, ctx.limits, self.sampling, &mut |o| {
                observe(Step::Round(o))
            })
            .await?;
            Ok(Answer {
                steps: a.steps,
                mean_active: 1.0,
                round_trips: u64::from(a.steps),
                ..Answer::new(a.text, a.finish)
            })
        })
    }
}

/// What a `single:NAME` request produced.
#[derive(Debug)]
pub struct SingleAnswer {
    /// The answer.
    pub text: String,
    /// Why it ended.
    pub finish: Finish,
    /// Segments drafted.
    pub steps: u32,
}

/// Tokens per segment of a `single:NAME` request (each segment is one step and one stream delta).
pub const SINGLE_SEGMENT: u32 = 64;

/// `single:NAME`: node `index` drafts the whole answer in segments of [`SINGLE_SEGMENT`] tokens;
/// each segment is reported to `on_round` as a one-candidate round (so streams get text deltas), and
/// `on_round` returning false cancels the request. Reaching the node's context limit ends the answer
/// with [`Finish::Length`] and the text so far.
pub async fn single(
    node: &mut NodeClient,
    index: usize,
    limits: &Limits,
    sampling: pb::Sampling,
    on_round: &mut (dyn FnMut(&RoundOutcome) -> bool + Send),
) -> Result<SingleAnswer> {
    let mut text = String::new();
    let mut steps = 0u32;
    let finish = loop {
        let p = match node.propose(SINGLE_SEGMENT, &limits.stop, sampling).await {
            Ok(p) => p,
            // The answer filled the node's context: it ends there, text kept.
            Err(e) if context_full(&e) && !text.is_empty() => break Finish::Length,
            Err(e) => return Err(e),
        };
        steps += 1;
        node.accept(&p.text);
        let before = text.len();
        text.push_str(&p.text);
        let mut end = None;
        if let Some(cut) = limits.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(cut);
            end = Some(Finish::Stop);
        } else if let Some((cut, _)) = text.char_indices().nth(limits.max_chars) {
            // Past max_chars, even when the segment ended with EOS after the cut.
            text.truncate(cut);
            end = Some(Finish::Length);
        } else if matches!(p.finish_reason(), pb::FinishReason::Eos | pb::FinishReason::Stop) {
            end = Some(Finish::Eos);
        } else {
            // Fewer tokens than asked with LENGTH: the node's context limit came first.
            let short = (p.token_logprobs.len() as u32) < SINGLE_SEGMENT;
            if text.chars().count() >= limits.max_chars || p.text.is_empty() || short {
                end = Some(Finish::Length);
            }
        }
        let delta = text.get(before.min(text.len())..).unwrap_or_default().to_owned();
        let round = single_round(steps, index, delta, end.is_some());
        if !on_round(&round) {
            return Err(Error::Cancelled);
        }
        if let Some(f) = end {
            break f;
        }
    };
    node.close().await;
    Ok(SingleAnswer { text, finish, steps })
}

/// A `single:NAME` segment as a one-candidate round of node `index`.
fn single_round(round: u32, index: usize, text: String, ends_answer: bool) -> RoundOutcome {
    RoundOutcome {
        round: u64::from(round),
        active: vec![index],
        candidates: vec![Candidate {
            text: text.clone(),
            proposers: vec![index],
            ends_answer,
        }],
        verifiers: vec![],
        ignored_verifiers: vec![],
        combined: vec![0.0],
        winner: Winner {
            candidate: Some(0),
            node: index,
            text,
            ends_answer,
        },
        cumulative: vec![],
        exit: None,
        rewards: vec![],
        weights: vec![],
    }
}
