//! The engine thread's scheduler (continuous batching): it admits the calls that arrived between two
//! steps, then runs one step.
//!
//! - A proposal is resolved and prefilled at admission, then joins the running set; every step
//!   advances every running proposal by one token in **one** forward pass
//!   ([`Transformer::forward_chunks`](crate::model::Transformer::forward_chunks)): the weights are read
//!   once for all sequences, attention runs per sequence on its own cache. Sequences join and leave
//!   between steps, a cancelled call leaves at the next step, and every running sequence advances at
//!   every step, so none starves.
//! - A score (`ScoreCandidates`) is prepared at admission (its context resolved, its candidates
//!   tokenized) and its candidates' rows run in the next step: **inside the decode pass** while the
//!   step stays within [`BATCH_INVARIANT_ROWS`] rows, else in a pass of its own right after it
//!   (several scores sharing one up to that size). Every score is answered within the step it was
//!   admitted at, so none waits on the decodes. Within that many rows every row's result is the same
//!   whatever else the pass holds, so a merged score is bit-identical to one run alone.
//! - Other calls (string-prefix scores, next-character questions, closes) run at once, between two
//!   steps.
//!
//! Admission is bounded twice: by the queue (`RESOURCE_EXHAUSTED` when full) and by the KV budget
//! (a proposal whose context + new tokens can never fit is refused at once; one that fits the budget
//! but not beside the running ones waits, in arrival order, until they finish).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::mpsc;

use super::decode::{Decode, Next, Start};
use super::ops::ScorePlan;
use super::session::{Session, Usage};
use super::{ContextSpec, Engine, Envelope, Job, Reply};
use crate::error::{Error, Result};
use crate::model::BATCH_INVARIANT_ROWS;

/// A running proposal and who waits for it.
struct Running {
    decode: Decode,
    call: Envelope,
    started: Instant,
    queue_ms: f64,
}

/// A prepared score whose candidates' rows run in the next step, and who waits for it.
struct Scoring {
    session: Session,
    usage: Usage,
    plan: ScorePlan,
    /// RTD: the call's λ.
    lambda: Option<f64>,
    call: Envelope,
    started: Instant,
    queue_ms: f64,
}

/// A call not started yet, and the KV bytes it needs once known (a proposal that had to wait).
struct Waiting {
    call: Envelope,
    needs: Option<usize>,
}

/// The engine thread: admits calls between steps and runs a step while proposals run or scores
/// wait, until every handle is gone and the running ones are done.
pub(super) fn serve(mut engine: Engine, mut rx: mpsc::UnboundedReceiver<Envelope>) {
    let mut running: Vec<Running> = Vec::new();
    let mut scoring: Vec<Scoring> = Vec::new();
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    let mut open = true;
    loop {
        // Take what arrived: block only when there is nothing else to do.
        let idle = running.is_empty() && waiting.is_empty();
        if idle && !open {
            break;
        }
        if idle {
            match rx.blocking_recv() {
                Some(call) => arrive(&mut engine, &mut waiting, call),
                None => break,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(call) => arrive(&mut engine, &mut waiting, call),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        admit(&mut engine, &mut running, &mut scoring, &mut waiting);
        if !running.is_empty() || !scoring.is_empty() {
            step(&mut engine, &mut running, &mut scoring);
        }
    }
}

/// Takes an arrived call: a close runs at once (it never waits behind work), the rest queue.
fn arrive(engine: &mut Engine, waiting: &mut VecDeque<Waiting>, call: Envelope) {
    if let Job::Close(_) = &call.job {
        let result = engine.run(call.job, 0.0, &|| false);
        let _ = call.reply.send(result);
    } else {
        waiting.push_back(Waiting { call, needs: None });
    }
}

/// Starts what can start, in arrival order: a proposal joins the running set if the KV budget has
/// room beside the running ones (else it and everything after it wait; its need is remembered, so
/// it is not resolved again until it fits); a score is prepared for the next step; other calls run
/// at once.
fn admit(
    engine: &mut Engine,
    running: &mut Vec<Running>,
    scoring: &mut Vec<Scoring>,
    waiting: &mut VecDeque<Waiting>,
) {
    while let Some(w) = waiting.pop_front() {
        if w.call.reply.is_closed() {
            engine.totals.queued.fetch_sub(1, Ordering::Relaxed);
            continue; // the client went away while queued
        }
        let held: usize = running.iter().map(|r| r.decode.reserved).sum();
        if w.needs
            .is_some_and(|n| held > 0 && held + n > engine.limits.kv_budget_bytes)
        {
            waiting.push_front(w);
            return;
        }
        let call = w.call;
        let queue_ms = call.enqueued.elapsed().as_secs_f64() * 1e3;
        let started = Instant::now();
        match call.job.clone() {
            Job::Propose(ctx, params) => match engine.start_decode(ctx, params, held) {
                Ok(Start::Run(decode)) => {
                    engine.totals.queued.fetch_sub(1, Ordering::Relaxed);
                    running.push(Running {
                        decode: *decode,
                        call,
                        started,
                        queue_ms,
                    });
                }
                Ok(Start::Wait(needs)) => {
                    waiting.push_front(Waiting {
                        call,
                        needs: Some(needs),
                    });
                    return;
                }
                Err(e) => {
                    engine.totals.queued.fetch_sub(1, Ordering::Relaxed);
                    engine.after_call();
                    let _ = call.reply.send(Err(e));
                }
            },
            Job::Score(ctx, candidates) => {
                engine.totals.queued.fetch_sub(1, Ordering::Relaxed);
                let lambda = ctx.rtd_lambda;
                match engine.begin_score(ctx, &candidates) {
                    Ok((session, usage, plan)) => {
                        let sc = Scoring {
                            session,
                            usage,
                            plan,
                            lambda,
                            call,
                            started,
                            queue_ms,
                        };
                        if sc.plan.rows() == 0 {
                            engine.end_score(sc, Ok(None));
                        } else {
                            scoring.push(sc);
                        }
                    }
                    Err(e) => {
                        engine.after_call();
                        let _ = call.reply.send(Err(e));
                    }
                }
            }
            job => {
                engine.totals.queued.fetch_sub(1, Ordering::Relaxed);
                let reply = &call.reply;
                let result = engine.run(job, queue_ms, &|| reply.is_closed());
                let _ = call.reply.send(result);
            }
        }
    }
}

/// One step: every running proposal picks its token; one batched pass runs those that go on with
/// the scores that fit beside them; the other scores run in passes of their own.
fn step(engine: &mut Engine, running: &mut Vec<Running>, scoring: &mut Vec<Scoring>) {
    let mut going = Vec::with_capacity(running.len());
    let mut tokens = Vec::with_capacity(running.len());
    for mut r in std::mem::take(running) {
        if r.call.reply.is_closed() {
            engine.abandon(r.decode);
            engine.after_call();
            continue; // the client left: the sequence leaves at once
        }
        match engine.pick(&mut r.decode) {
            Next::Done(finish) => {
                let (mut p, mut usage) = engine.finish_decode(r.decode, finish);
                (usage.queue_ms, usage.compute_ms) = (r.queue_ms, r.started.elapsed().as_secs_f64() * 1e3);
                p.usage = usage;
                engine.after_call();
                let _ = r.call.reply.send(Ok(Reply::Proposal(p)));
            }
            Next::Feed(tok) => {
                tokens.push(tok);
                going.push(r);
            }
        }
    }
    // Scores whose client left are dropped; the others go beside the decodes while the pass stays
    // batch-invariant, the rest after.
    let (mut merged, mut alone) = (Vec::new(), Vec::new());
    let mut rows = tokens.len();
    for sc in std::mem::take(scoring) {
        if sc.call.reply.is_closed() {
            engine.end_score(sc, Err(Error::Cancelled));
        } else if !going.is_empty() && rows + sc.plan.rows() <= BATCH_INVARIANT_ROWS {
            rows += sc.plan.rows();
            merged.push(sc);
        } else {
            alone.push(sc);
        }
    }
    if !going.is_empty() {
        let mut decodes: Vec<&mut Decode> = going.iter_mut().map(|r| &mut r.decode).collect();
        let plans: Vec<_> = merged.iter().map(|s| (&s.plan, s.lambda)).collect();
        match engine.feed(&mut decodes, &tokens, &plans) {
            Ok((rows, ms)) => {
                *running = going;
                hand_out(engine, merged, rows, ms);
            }
            Err(e) => {
                let msg = e.to_string();
                for r in going {
                    engine.abandon(r.decode);
                    engine.after_call();
                    let _ = r.call.reply.send(Err(Error::Internal(msg.clone())));
                }
                for sc in merged {
                    engine.end_score(sc, Err(Error::Internal(msg.clone())));
                }
            }
        }
    }
    // The rest share passes of their own, up to the same size (a larger score runs alone).
    let mut group: Vec<Scoring> = Vec::new();
    let mut group_rows = 0;
    for sc in alone {
        if !group.is_empty() && group_rows + sc.plan.rows() > BATCH_INVARIANT_ROWS {
            score_pass(engine, std::mem::take(&mut group));
            group_rows = 0;
        }
        group_rows += sc.plan.rows();
        group.push(sc);
    }
    if !group.is_empty() {
        score_pass(engine, group);
    }
}

/// One pass of scores' rows only.
fn score_pass(engine: &mut Engine, group: Vec<Scoring>) {
    let plans: Vec<_> = group.iter().map(|s| (&s.plan, s.lambda)).collect();
    match engine.feed(&mut [], &[], &plans) {
        Ok((rows, ms)) => hand_out(engine, group, rows, ms),
        Err(e) => {
            let msg = e.to_string();
            for sc in group {
                engine.end_score(sc, Err(Error::Internal(msg.clone())));
            }
        }
    }
}

/// Gives each score its rows of a pass (in order) and answers it.
fn hand_out(engine: &mut Engine, scores: Vec<Scoring>, rows: Vec<Vec<f32>>, ms: f64) {
    let mut rows = rows.into_iter();
    for sc in scores {
        let mine: Vec<Vec<f32>> = rows.by_ref().take(sc.plan.rows()).collect();
        engine.end_score(sc, Ok(Some((mine, ms))));
    }
}

impl Engine {
    /// Resolves a score's context and prepares it ([`Engine::score_plan`]) under its RTD λ. On an
    /// error the session is back in place.
    fn begin_score(
        &mut self,
        ctx: ContextSpec,
        candidates: &[String],
    ) -> Result<(Session, Usage, ScorePlan)> {
        let lambda = ctx.rtd_lambda;
        let mut session = self.resolve(ctx)?;
        let mut usage = Usage {
            context_tokens: session.tokens.len(),
            ..Usage::default()
        };
        self.model.set_rtd_lambdas(lambda.map(|l| vec![Some(l)]));
        let plan = self.score_plan(&mut session, candidates, &mut usage);
        self.model.set_rtd_lambdas(None);
        match plan {
            Ok(plan) => Ok((session, usage, plan)),
            Err(e) => {
                self.count_work(&usage);
                self.sessions.put(session);
                Err(e)
            }
        }
    }

    /// Answers a score: from its rows of a pass and the pass's ms (`None`: it had no rows), or with
    /// the pass's error. The session goes back, the counters move.
    fn end_score(&mut self, sc: Scoring, rows: Result<Option<(Vec<Vec<f32>>, f64)>>) {
        let Scoring {
            session,
            mut usage,
            plan,
            call,
            started,
            queue_ms,
            ..
        } = sc;
        if let Ok(Some((_, ms))) = &rows {
            usage.forward_ms += ms;
            usage.forward_passes += 1;
            usage.computed_positions += plan.rows();
        }
        let reply = rows.map(|rows| {
            let mut scores = plan.finish(rows.as_ref().map_or(&[][..], |(r, _)| r));
            scores.usage = Usage {
                queue_ms,
                compute_ms: started.elapsed().as_secs_f64() * 1e3,
                ..usage
            };
            Reply::Scores(scores)
        });
        self.count_work(&usage);
        self.sessions.put(session);
        self.after_call();
        let _ = call.reply.send(reply);
    }
}
