//! The async edge of the strategies: fan the calls out to the nodes in parallel, feed the answers to
//! the state machines ([`SpecFuse`], [`CharEd`]), broadcast what was accepted, and drop nodes that fail
//! (the request goes on with the others). Each SpecFuse round and each CharED character is one span
//! (`round`, `char_step`) that parents the node calls made for it.

use ensemble_proto::v1 as pb;
use futures::future::join_all;
use tracing::Instrument as _;
use tracing::field::Empty;

use crate::chared::{CharEd, CharOutcome, CharStep, CharedParams};
use crate::error::{Error, Result};
use crate::node_client::NodeClient;
use crate::specfuse::{DraftText, RoundOutcome, SpecFuse, SpecFuseParams};

mod speculative;

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

/// Frees every node's session, in parallel (each close waits at most
/// [`crate::node_client::CLOSE_WAIT`]; a hung node's close goes on in the background).
async fn close_all(nodes: &mut [NodeClient]) {
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
fn full_is_length(finish: Result<Finish>, answer: &str, failed: &[(usize, Error)]) -> Result<Finish> {
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

/// A finished CharED request.
#[derive(Debug)]
pub struct CharEdAnswer {
    /// The answer.
    pub text: String,
    /// Why it ended.
    pub finish: Finish,
    /// Every character step, for the trace.
    pub steps: Vec<CharStep>,
    /// Nodes that failed during the request, with the error.
    pub failed: Vec<(usize, Error)>,
    /// Waves of node calls that ran one after another.
    pub round_trips: u64,
}

/// Runs one CharED request over `nodes` (already `begin`-ed): one next-character call per live node
/// per character, in parallel; or, with `draft_chars` > 0, speculative rounds
/// ([`speculative::round`]).
pub async fn chared(
    nodes: &mut [NodeClient],
    params: CharedParams,
    limits: &Limits,
    observe: &mut (dyn FnMut(&CharStep) -> bool + Send),
) -> Result<CharEdAnswer> {
    let mut ce = CharEd::new(params, nodes.len())?;
    let query = ce.node_query();
    let mut live: Vec<bool> = vec![true; nodes.len()];
    let mut answer = String::new();
    let mut steps = Vec::new();
    let mut failed = Vec::new();
    let mut round_trips = 0;
    let finish: Result<Finish> = async {
        Ok(loop {
            if !live.iter().any(|&l| l) {
                return Err(Error::NoActiveNode);
            }
            if ce.params().draft_chars > 0 || ce.params().gate.is_some() {
                let mut w = speculative::Writer {
                    answer: &mut answer,
                    steps: &mut steps,
                    limits,
                    observe: &mut *observe,
                };
                let r = speculative::round(&mut ce, nodes, &mut live, &mut failed, &mut w).await?;
                round_trips += r.waves;
                match r.finish {
                    Some(f) => break f,
                    None => continue,
                }
            }
            round_trips += 1;
            let span = tracing::info_span!(
                "char_step",
                step = steps.len() as i64 + 1,
                nodes = live.iter().filter(|&&l| l).count() as i64,
                prob = Empty,
                eos = Empty
            );
            let calls = nodes
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| live[*i])
                .map(|(i, n)| async move {
                    (
                        i,
                        n.next_char(query.top_k, query.max_hypotheses, query.lookahead)
                            .await,
                    )
                });
            let mut dists = Vec::new();
            for (i, r) in join_all(calls).instrument(span.clone()).await {
                match r {
                    Ok(d) => dists.push((
                        i,
                        speculative::node_dist(&pb::CharDistribution {
                            chars: d.chars,
                            eos_prob: d.eos_prob,
                            residual: d.residual,
                        }),
                    )),
                    Err(e) => {
                        live[i] = false;
                        failed.push((i, e));
                    }
                }
            }
            let step = ce.combine(&dists)?;
            span.record("prob", step.prob);
            span.record("eos", step.chosen == CharOutcome::Eos);
            let mut w = speculative::Writer {
                answer: &mut answer,
                steps: &mut steps,
                limits,
                observe: &mut *observe,
            };
            let mut accepted = String::new();
            let finish = w.take(vec![step], &mut accepted)?;
            for n in nodes.iter_mut() {
                n.accept(&accepted);
            }
            if let Some(f) = finish {
                break f;
            }
        })
    }
    .await;
    close_all(nodes).await;
    let finish = full_is_length(finish, &answer, &failed).map_err(|e| verdict(e, &failed))?;
    Ok(CharEdAnswer {
        text: answer,
        finish,
        steps,
        failed,
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
        } else if matches!(p.finish_reason(), pb::FinishReason::Eos | pb::FinishReason::Stop) {
            end = Some(Finish::Eos);
        } else if let Some((cut, _)) = text.char_indices().nth(limits.max_chars) {
            text.truncate(cut);
            end = Some(Finish::Length);
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
        candidates: vec![crate::specfuse::Candidate {
            text: text.clone(),
            proposers: vec![index],
            ends_answer,
        }],
        verifiers: vec![],
        ignored_verifiers: vec![],
        combined: vec![0.0],
        winner: crate::specfuse::Winner {
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
