//! Speculative CharED, the async edge: per round, the drafting node ([`CharEd::drafter`]) drafts and answers along its
//! draft (one call), every other live node answers along the same draft (one call each, in
//! parallel), and [`CharEd::accept_draft`] keeps the longest prefix the mixture agrees with plus its
//! own next character. Two waves of calls per round (one with a single node) instead of one per
//! character. Each round is one span (`char_round`) that parents its node calls.

use ensemble_proto::v1 as pb;
use futures::future::join_all;
use tracing::Instrument as _;
use tracing::field::Empty;

use super::{Finish, Limits};
use crate::chared::{CharEd, CharOutcome, CharStep, NodeCharDist};
use crate::error::{Error, Result};
use crate::node_client::NodeClient;

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

/// Runs one round; appends accepted characters to `answer` (and every node's context) and the
/// steps to `steps`. A node that fails is marked dead and recorded in `failed`; a failed drafter
/// ends the round with nothing accepted (the next round drafts with another node).
#[allow(clippy::too_many_arguments)]
pub(super) async fn round(
    ce: &mut CharEd,
    nodes: &mut [NodeClient],
    live: &mut [bool],
    answer: &mut String,
    steps: &mut Vec<CharStep>,
    failed: &mut Vec<(usize, Error)>,
    limits: &Limits,
    observe: &mut (dyn FnMut(&CharStep) -> bool + Send),
) -> Result<Round> {
    let query = ce.node_query();
    let Some(d) = ce.drafter(live) else {
        return Err(Error::NoActiveNode);
    };
    let left = limits.max_chars.saturating_sub(answer.chars().count());
    // A full draft plus the mixture's next character is at most what the answer may still take.
    let draft_chars = ce.params().draft_chars.min(left.saturating_sub(1) as u32);
    let span = tracing::info_span!(
        "char_round",
        round = ce.rounds() as i64 + 1,
        drafter = d as i64,
        drafted = Empty,
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
    span.record("drafted", draft.len() as i64);
    let mut answers: Vec<(usize, Vec<pb::CharDistribution>)> = vec![(d, drafted.positions)];
    let text = drafted.drafted;
    let waves = if live.iter().enumerate().any(|(i, &l)| l && i != d) {
        2
    } else {
        1
    };
    let calls = nodes
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| live[*i] && *i != d)
        .map(|(i, n)| {
            let text = &text;
            async move {
                let r = n
                    .next_chars(text, 0, query.top_k, query.max_hypotheses, query.lookahead)
                    .await;
                (i, r)
            }
        });
    for (i, r) in join_all(calls).instrument(span.clone()).await {
        match r {
            Ok(r) => answers.push((i, r.positions)),
            Err(e) => {
                live[i] = false;
                failed.push((i, e));
            }
        }
    }
    let positions: Vec<Vec<(usize, NodeCharDist)>> = (0..=draft.len())
        .map(|j| {
            answers
                .iter()
                .filter_map(|(i, ps)| ps.get(j).map(|p| (*i, node_dist(p))))
                .collect()
        })
        .collect();
    let taken = ce.accept_draft(&positions, &draft)?;
    span.record("accepted", taken.iter().filter(|s| s.drafted).count() as i64);
    let mut accepted = String::new();
    let mut finish = None;
    for step in taken {
        if !observe(&step) {
            return Err(Error::Cancelled);
        }
        let chosen = step.chosen;
        steps.push(step);
        match chosen {
            CharOutcome::Eos => {
                finish = Some(Finish::Eos);
                break;
            }
            CharOutcome::Char(c) => {
                answer.push(c);
                accepted.push(c);
            }
        }
        if let Some(cut) = limits.stop.iter().filter_map(|s| answer.find(s.as_str())).min() {
            answer.truncate(cut);
            finish = Some(Finish::Stop);
            break;
        }
        if answer.chars().count() >= limits.max_chars {
            finish = Some(Finish::Length);
            break;
        }
    }
    for n in nodes.iter_mut() {
        n.accept(&accepted);
    }
    Ok(Round { finish, waves })
}
