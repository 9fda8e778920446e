//! SpecFuse's async edge: the propose / verify fan-out of each round ([`specfuse`]), the mapping of
//! the request's `SpecFuseOptions` onto the defaults, and the registration ([`SpecFuseStrategy`]).
//! Each round is one span (`round`) that parents the node calls made for it.

use ensemble_proto::v1 as pb;
use futures::future::{BoxFuture, join_all};
use tracing::Instrument as _;
use tracing::field::Empty;

use super::{DraftText, OnlineWeights, RoundOutcome, SpecFuse, SpecFuseParams};
use crate::error::{Error, Result};
use crate::node_client::NodeClient;
use crate::strategy::{
    Answer, Ctx, Finish, Limits, Request, Run, Step, Strategy, close_all, full_is_length, verdict,
};

/// `specfuse`.
pub struct SpecFuseStrategy;

impl Strategy for SpecFuseStrategy {
    fn name(&self) -> &'static str {
        "specfuse"
    }

    fn plan(&self, r: &Request<'_>) -> Result<Box<dyn Run>> {
        let o = r.request.specfuse.clone();
        let weights = r.weights(&o.as_ref().map(|o| o.weights.clone()).unwrap_or_default());
        let params = params(&r.settings.specfuse, o, weights);
        params.validate()?;
        Ok(Box::new(SpecFuseRun {
            params,
            sampling: r.sampling(),
        }))
    }
}

struct SpecFuseRun {
    params: SpecFuseParams,
    sampling: pb::Sampling,
}

impl Run for SpecFuseRun {
    fn run<'a>(self: Box<Self>, ctx: Ctx<'a>) -> BoxFuture<'a, Result<Answer>> {
        Box::pin(async move {
            let observe = ctx.observe;
            let a = specfuse(ctx.nodes, self.params, ctx.limits, self.sampling, &mut |o| {
                observe(Step::Round(o))
            })
            .await?;
            Ok(Answer {
                steps: a.rounds.len() as u32,
                mean_active: a.mean_active,
                exited: a.rounds.iter().flat_map(|o| o.exited()).collect(),
                failed: a.failed,
                round_trips: a.round_trips,
                ..Answer::new(a.text, a.finish)
            })
        })
    }
}

/// The request's options over the coordinator's defaults.
pub fn params(
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

/// A finished SpecFuse request.
#[derive(Debug)]
pub struct SpecFuseAnswer {
    /// The answer.
    pub text: String,
    /// Why it ended.
    pub finish: Finish,
    /// Every round, for the trace.
    pub rounds: Vec<RoundOutcome>,
    /// Nodes that failed during the request, with the error.
    pub failed: Vec<(usize, Error)>,
    /// Mean active nodes per round.
    pub mean_active: f64,
    /// Waves of node calls that ran one after another (propose, then verify when there were drafts).
    pub round_trips: u64,
}

/// Runs one SpecFuse request over `nodes` (already `begin`-ed with the request's session and prompt).
pub async fn specfuse(
    nodes: &mut [NodeClient],
    params: SpecFuseParams,
    limits: &Limits,
    sampling: pb::Sampling,
    observe: &mut (dyn FnMut(&RoundOutcome) -> bool + Send),
) -> Result<SpecFuseAnswer> {
    let mut sf = SpecFuse::new(params, nodes.len())?;
    let mut answer = String::new();
    let mut rounds = Vec::new();
    let mut failed = Vec::new();
    let mut round_trips = 0u64;
    let segment = sf.params().segment_tokens;
    let (string_prefix, per_char) = (sf.params().string_prefix, sf.params().per_char);
    let finish: Result<Finish> = async {
        Ok(loop {
            // PROPOSE, in parallel over the active nodes.
            let active = sf.active_nodes();
            if active.is_empty() {
                return Err(Error::NoActiveNode);
            }
            let span = tracing::info_span!(
                "round",
                round = rounds.len() as i64 + 1,
                active = active.len() as i64,
                candidates = Empty,
                winner_node = Empty,
                winner_score = Empty,
                winner_chars = Empty,
                exited = Empty
            );
            // GATE (optional): the lead drafts alone; a sure draft wins the round unverified.
            let mut raw = Vec::new();
            let mut lead = None;
            let mut gated = None;
            if let (Some(gate), Some(l)) = (sf.params().gate, sf.lead()) {
                lead = Some(l);
                round_trips += 1;
                match nodes[l]
                    .propose(segment, &limits.stop, sampling)
                    .instrument(span.clone())
                    .await
                {
                    Ok(p) => {
                        let sure = p.token_logprobs.iter().all(|&lp| f64::from(lp).exp() >= gate);
                        let draft = (l, draft_text(p));
                        if sure {
                            gated = Some(sf.accept_lead(&sf.prepare_drafts(vec![draft]), l)?);
                        } else {
                            raw.push(draft);
                        }
                    }
                    Err(e) => {
                        failed.push((l, e));
                        sf.node_failed(l)?;
                    }
                }
            }
            let outcome = match gated {
                Some(o) => o,
                None => {
                    round_trips += 1;
                    let calls = nodes
                        .iter_mut()
                        .enumerate()
                        .filter(|(i, _)| active.contains(i) && Some(*i) != lead)
                        .map(|(i, n)| async move { (i, n.propose(segment, &limits.stop, sampling).await) });
                    for (i, r) in join_all(calls).instrument(span.clone()).await {
                        match r {
                            Ok(p) => raw.push((i, draft_text(p))),
                            Err(e) => {
                                failed.push((i, e));
                                sf.node_failed(i)?;
                            }
                        }
                    }
                    let drafts = sf.prepare_drafts(raw);
                    // VERIFY, in parallel: every active node scores every distinct draft.
                    let texts: Vec<String> = drafts.texts().into_iter().map(str::to_owned).collect();
                    // With string-prefix scoring a draft that ends the answer is priced with its end.
                    let ends: Vec<bool> = if string_prefix {
                        drafts.candidates.iter().map(|c| c.ends_answer).collect()
                    } else {
                        vec![]
                    };
                    let mut scores = Vec::new();
                    if !texts.is_empty() {
                        round_trips += 1;
                        let active = sf.active_nodes();
                        let calls = nodes
                            .iter_mut()
                            .enumerate()
                            .filter(|(i, _)| active.contains(i))
                            .map(|(i, n)| {
                                let (texts, ends) = (&texts, &ends);
                                async move { (i, n.score(texts, string_prefix, ends).await) }
                            });
                        for (i, r) in join_all(calls).instrument(span.clone()).await {
                            match r {
                                Ok(s) => scores
                                    .push((i, s.scores.iter().map(|c| draft_score(c, per_char)).collect())),
                                Err(e) => {
                                    failed.push((i, e));
                                    sf.node_failed(i)?;
                                }
                            }
                        }
                    }
                    sf.combine(&drafts, &scores)?
                }
            };
            span.record("candidates", outcome.candidates.len() as i64);
            span.record("winner_node", outcome.winner.node as i64);
            span.record("winner_chars", outcome.winner.text.chars().count() as i64);
            if let Some(best) = outcome.combined.iter().copied().reduce(f64::max) {
                span.record("winner_score", best);
            }
            span.record("exited", outcome.exited().len() as i64);
            // BROADCAST the winner.
            answer.push_str(&outcome.winner.text);
            let ends = outcome.winner.ends_answer;
            for n in nodes.iter_mut() {
                n.accept(&outcome.winner.text);
            }
            if !observe(&outcome) {
                return Err(Error::Cancelled);
            }
            rounds.push(outcome);
            if let Some(cut) = limits.stop.iter().filter_map(|s| answer.find(s.as_str())).min() {
                answer.truncate(cut);
                break Finish::Stop;
            }
            if ends {
                break Finish::Eos;
            }
            if answer.chars().count() >= limits.max_chars {
                if let Some((i, _)) = answer.char_indices().nth(limits.max_chars) {
                    answer.truncate(i);
                }
                break Finish::Length;
            }
        })
    }
    .await;
    // Free the nodes' sessions whatever happened (finished, failed or cancelled).
    close_all(nodes).await;
    let finish = full_is_length(finish, &answer, &failed).map_err(|e| verdict(e, &failed))?;
    Ok(SpecFuseAnswer {
        text: answer,
        finish,
        rounds,
        failed,
        mean_active: sf.mean_active_nodes().unwrap_or(0.0),
        round_trips,
    })
}

/// A proposal as SpecFuse reads it.
fn draft_text(p: pb::ProposeResponse) -> DraftText {
    let ended = matches!(p.finish_reason(), pb::FinishReason::Eos | pb::FinishReason::Stop);
    DraftText {
        text: p.text,
        finished_by_eos_or_stop: ended,
    }
}

/// A verifier's score of one draft: mean log-probability per token, or per character.
fn draft_score(c: &pb::CandidateScore, per_char: bool) -> f64 {
    if per_char {
        c.sum_logprob / f64::from(c.char_count.max(1))
    } else {
        c.mean_logprob
    }
}
