//! Speculative CharED, the async edge: per round, the drafting node ([`CharEd::drafter`]) drafts and answers along its
//! draft (one call), every other live node answers along the same draft (one call each, in
//! parallel), and [`CharEd::accept_draft`] keeps the longest prefix the mixture agrees with plus its
//! own next character. Two waves of calls per round (one with a single node) instead of one per
//! character. Each round is one span (`char_round`) that parents its node calls.

use ensemble_proto::v1 as pb;
use futures::future::join_all;
use tracing::Instrument as _;
use tracing::field::Empty;

use super::{CharEd, CharOutcome, CharStep, NodeCharDist};
use crate::error::{Error, Result};
use crate::node_client::NodeClient;
use crate::strategy::{Finish, Limits};

/// A node's distribution as [`CharEd`] reads it.
pub(super) fn node_dist(d: &pb::CharDistribution) -> NodeCharDist {
    NodeCharDist {
        chars: d
            .chars
            .iter()
            .filter_map(|c| Some((c.char.chars().next()?, c.prob)))
            .collect(),
        eos: d.eos_prob,
        residual: d.residual,
    }
}

/// What a round left: the answer's end, if it ended.
pub(super) struct Round {
    pub(super) finish: Option<Finish>,
    /// Waves of node calls it took (1 or 2).
    pub(super) waves: u64,
}

/// The answer being written and what the caller sees of it (both CharED modes append through it).
pub(super) struct Writer<'a> {
    pub(super) answer: &'a mut String,
    pub(super) steps: &'a mut Vec<CharStep>,
    pub(super) limits: &'a Limits,
    pub(super) observe: &'a mut (dyn FnMut(&CharStep) -> bool + Send),
}

impl Writer<'_> {
    /// Appends the steps' characters (to the answer and to `accepted`) until one ends the answer.
    pub(super) fn take(&mut self, taken: Vec<CharStep>, accepted: &mut String) -> Result<Option<Finish>> {
        for step in taken {
            if !(self.observe)(&step) {
                return Err(Error::Cancelled);
            }
            let chosen = step.chosen;
            self.steps.push(step);
            match chosen {
                CharOutcome::Eos => return Ok(Some(Finish::Eos)),
                CharOutcome::Char(c) => {
                    self.answer.push(c);
                    accepted.push(c);
                }
            }
            let stop = self
                .limits
                .stop
                .iter()
                .filter_map(|s| self.answer.find(s.as_str()))
                .min();
            if let Some(cut) = stop {
                self.answer.truncate(cut);
                return Ok(Some(Finish::Stop));
            }
            if self.answer.chars().count() >= self.limits.max_chars {
                return Ok(Some(Finish::Length));
            }
        }
        Ok(None)
    }
}

/// Runs one round; appends accepted characters to the answer (and every node's context). A node
/// that fails is marked dead and recorded in `failed`; a failed drafter ends the round with nothing
/// accepted (the next round drafts with another node). With the confidence gate, the positions the
/// drafter is sure of are decided by it alone, and the others are asked only from the first one it
/// is not sure of (not at all when it is sure of the whole draft and the character after it).
pub(super) async fn round(
    ce: &mut CharEd,
    nodes: &mut [NodeClient],
    live: &mut [bool],
    failed: &mut Vec<(usize, Error)>,
    w: &mut Writer<'_>,
) -> Result<Round> {
    let query = ce.node_query();
    let Some(d) = ce.drafter(live) else {
        return Err(Error::NoActiveNode);
    };
    let left = w.limits.max_chars.saturating_sub(w.answer.chars().count());
    // A full draft plus the mixture's next character is at most what the answer may still take.
    let draft_chars = ce.params().draft_chars.min(left.saturating_sub(1) as u32);
    let span = tracing::info_span!(
        "char_round",
        round = ce.rounds() as i64 + 1,
        drafter = d as i64,
        drafted = Empty,
        gated = Empty,
        accepted = Empty
    );
    let drafted = nodes[d]
        .next_chars(
            "",
            draft_chars,
            query.top_k,
            query.max_hypotheses,
            query.lookahead,
        )
        .instrument(span.clone())
        .await;
    let drafted = match drafted {
        Ok(r) => r,
        Err(e) => {
            live[d] = false;
            failed.push((d, e));
            return Ok(Round {
                finish: None,
                waves: 1,
            });
        }
    };
    let draft: Vec<char> = drafted.drafted.chars().collect();
    let lead: Vec<NodeCharDist> = drafted.positions.iter().map(node_dist).collect();
    ce.begin_round();
    let k = ce.confident_prefix(&lead, &draft);
    span.record("drafted", draft.len() as i64);
    span.record("gated", k as i64);
    let mut accepted = String::new();
    if k > 0 {
        let alone: Vec<Vec<(usize, NodeCharDist)>> = lead[..k].iter().map(|x| vec![(d, x.clone())]).collect();
        let taken = ce.continue_round(&alone, &draft[..k.min(draft.len())])?;
        let ended = taken.len() < k || taken.last().is_some_and(|s| !s.drafted);
        let finish = w.take(taken, &mut accepted)?;
        if finish.is_some() || ended {
            for n in nodes.iter_mut() {
                n.accept(&accepted);
            }
            return Ok(Round { finish, waves: 1 });
        }
        for n in nodes.iter_mut() {
            n.accept(&accepted);
        }
    }
    // Every other live node answers along the rest of the draft.
    let rest: String = draft[k..].iter().collect();
    let mut answers: Vec<(usize, Vec<NodeCharDist>)> = vec![(d, lead[k..].to_vec())];
    let others = live.iter().enumerate().any(|(i, &l)| l && i != d);
    let calls = nodes
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| live[*i] && *i != d)
        .map(|(i, n)| {
            let rest = &rest;
            async move {
                let r = n
                    .next_chars(rest, 0, query.top_k, query.max_hypotheses, query.lookahead)
                    .await;
                (i, r)
            }
        });
    for (i, r) in join_all(calls).instrument(span.clone()).await {
        match r {
            Ok(r) => answers.push((i, r.positions.iter().map(node_dist).collect())),
            Err(e) => {
                live[i] = false;
                failed.push((i, e));
            }
        }
    }
    let positions: Vec<Vec<(usize, NodeCharDist)>> = (0..=draft.len() - k)
        .map(|j| {
            answers
                .iter()
                .filter_map(|(i, ps)| ps.get(j).map(|p| (*i, p.clone())))
                .collect()
        })
        .collect();
    let taken = ce.continue_round(&positions, &draft[k..])?;
    ce.note_agreement(&positions, &taken);
    span.record(
        "accepted",
        (k + taken.iter().filter(|s| s.drafted).count()) as i64,
    );
    let mut rest_accepted = String::new();
    let finish = w.take(taken, &mut rest_accepted)?;
    for n in nodes.iter_mut() {
        n.accept(&rest_accepted);
    }
    Ok(Round {
        finish,
        waves: if others { 2 } else { 1 },
    })
}
