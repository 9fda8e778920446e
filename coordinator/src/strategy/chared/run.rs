//! CharED's async edge: one next-character call per live node per character, in parallel, or
//! speculative rounds (`chared/speculative.rs`); the mapping of the request's `CharEdOptions` onto
//! the defaults; the registration ([`CharEdStrategy`]). Each character is one span (`char_step`)
//! that parents the node calls made for it.

use ensemble_proto::v1 as pb;
use futures::future::{BoxFuture, join_all};
use tracing::Instrument as _;
use tracing::field::Empty;

use super::{CharEd, CharOutcome, CharStep, CharedParams, speculative};
use crate::error::{Error, Result};
use crate::node_client::NodeClient;
use crate::strategy::{
    Answer, Ctx, Finish, Limits, Request, Run, Step, Strategy, close_all, full_is_length, verdict,
};

/// `chared`.
pub struct CharEdStrategy;

impl Strategy for CharEdStrategy {
    fn name(&self) -> &'static str {
        "chared"
    }

    fn plan(&self, r: &Request<'_>) -> Result<Box<dyn Run>> {
        let o = r.request.chared.clone();
        let weights = r.weights(&o.as_ref().map(|o| o.weights.clone()).unwrap_or_default());
        let params = params(&r.settings.chared, o, weights);
        params.validate()?;
        Ok(Box::new(CharEdRun(params)))
    }
}

struct CharEdRun(CharedParams);

impl Run for CharEdRun {
    fn run<'a>(self: Box<Self>, ctx: Ctx<'a>) -> BoxFuture<'a, Result<Answer>> {
        Box::pin(async move {
            let observe = ctx.observe;
            let a = chared(ctx.nodes, self.0, ctx.limits, &mut |c| observe(Step::Char(c))).await?;
            Ok(Answer {
                steps: a.steps.len() as u32,
                failed: a.failed,
                round_trips: a.round_trips,
                ..Answer::new(a.text, a.finish)
            })
        })
    }
}

/// The request's options over the coordinator's defaults.
pub fn params(
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
    if let Some(v) = o.entropy_beta {
        p.entropy_beta = v;
    }
    p
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
                            observed: None,
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
