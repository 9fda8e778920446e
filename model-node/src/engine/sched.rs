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
//! - A walk (a next-character question or a string-prefix score: a search over token paths whose
//!   next forward pass depends on the last one, [`super::walk`]) starts at admission and runs up to
//!   the first pass it needs; each step then runs the pass every waiting walk asked for, inside the
//!   decode pass while the step stays within [`BATCH_INVARIANT_ROWS`] rows, else in passes of their
//!   own shared with other walks and scores, and the walk runs on to its next pass or its reply.
//!   Within that many rows a walk's passes give the same bits whatever they share a pass with, so
//!   its answer is the one it gives alone. A close runs at once, between two steps.
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
use super::walk::{self, Ask, Walk, WalkEnd};
use super::{ContextSpec, Engine, Envelope, Job, Reply};
use crate::error::{Error, Result};
use crate::model::BATCH_INVARIANT_ROWS;

/// A running proposal and who waits for it.
struct Running {
    decode: Decode,
    call: Envelope,
    started: Instant,
    queue_ms: f64,
    /// The session closed while it ran, dropped when it ends.
    closing: Option<String>,
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

/// A walk waiting for its next pass, and who waits for it.
struct Walking {
    walk: Walk,
    call: Envelope,
    started: Instant,
    queue_ms: f64,
    /// The session closed while it ran, dropped when it ends.
    closing: Option<String>,
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
    let mut walking: Vec<Walking> = Vec::new();
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    let mut open = true;
    loop {
        // Take what arrived: block only when there is nothing else to do.
        let idle = running.is_empty() && waiting.is_empty() && walking.is_empty();
        if idle && !open {
            break;
        }
        if idle {
            match rx.blocking_recv() {
                Some(call) => arrive(&mut engine, &mut waiting, &mut running, &mut walking, call),
                None => break,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(call) => arrive(&mut engine, &mut waiting, &mut running, &mut walking, call),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        admit(
            &mut engine,
            &mut running,
            &mut scoring,
            &mut walking,
            &mut waiting,
        );
        if !running.is_empty() || !scoring.is_empty() || !walking.is_empty() {
            step(&mut engine, &mut running, &mut scoring, &mut walking);
        }
    }
}

/// Takes an arrived call: a close runs at once (it never waits behind work), the rest queue. A
/// session that a running proposal or walk holds is closed when that call ends (else it would put
/// the session back).
fn arrive(
    engine: &mut Engine,
    waiting: &mut VecDeque<Waiting>,
    running: &mut [Running],
    walking: &mut [Walking],
    call: Envelope,
) {
    if let Job::Close(id) = &call.job {
        let mut held = false;
        if !id.is_empty() {
            for r in running.iter_mut().filter(|r| r.decode.session_id() == id) {
                r.closing = Some(id.clone());
                held = true;
            }
            for w in walking.iter_mut().filter(|w| w.walk.session == *id) {
                w.closing = Some(id.clone());
                held = true;
            }
        }
        let result = engine.run(call.job, 0.0, &|| false).map(|r| match r {
            Reply::Closed(existed) => Reply::Closed(existed || held),
            other => other,
        });
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
    walking: &mut Vec<Walking>,
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
                        closing: None,
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
            job if walk::is_walk(&job) => {
                engine.totals.queued.fetch_sub(1, Ordering::Relaxed);
                match engine.begin_walk(job) {
                    Ok(walk) => {
                        // Run it up to its first pass (or its end: everything it needs is cached).
                        let w = Walking {
                            walk,
                            call,
                            started,
                            queue_ms,
                            closing: None,
                        };
                        go_on(engine, w, walking);
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
/// the scores and the walks' asked positions that fit beside them; the other scores and asks run in
/// passes of their own; then every walk that got its answer runs on to its next pass or its reply.
fn step(
    engine: &mut Engine,
    running: &mut Vec<Running>,
    scoring: &mut Vec<Scoring>,
    walking: &mut Vec<Walking>,
) {
    let mut going = Vec::with_capacity(running.len());
    let mut tokens = Vec::with_capacity(running.len());
    for mut r in std::mem::take(running) {
        if r.call.reply.is_closed() {
            engine.abandon(r.decode);
            drop_if_closed(engine, r.closing);
            engine.after_call();
            continue; // the client left: the sequence leaves at once
        }
        match engine.pick(&mut r.decode) {
            Next::Done(finish) => {
                let (mut p, mut usage) = engine.finish_decode(r.decode, finish);
                drop_if_closed(engine, r.closing);
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
    // Scores whose client left are dropped; the others, and the walks' asks, go beside the decodes
    // while the pass stays batch-invariant, the rest after.
    let (mut merged, mut alone) = (Vec::new(), Vec::new());
    let mut rows = tokens.len();
    for sc in std::mem::take(scoring) {
        if sc.call.reply.is_closed() {
            engine.end_score(sc, Err(Error::Cancelled));
        } else if !going.is_empty() && rows + sc.plan.rows() <= BATCH_INVARIANT_ROWS {
            rows += sc.plan.rows();
            merged.push(sc);
        } else {
            alone.push(Extra::Score(sc));
        }
    }
    // Every waiting walk's asks: (walk, ask id, ask).
    let mut walks = Vec::with_capacity(walking.len());
    let mut per_walk = Vec::with_capacity(walking.len());
    for w in std::mem::take(walking) {
        let asks = w.walk.take_asks();
        if asks.is_empty() {
            // Cannot happen (a walk waits only for the passes it asked for, every one answered in
            // the step it was asked in); were it to, polling it again would wait forever.
            engine.after_call();
            let _ = w
                .call
                .reply
                .send(Err(Error::Internal("a walk waited with no pass to run".into())));
            continue;
        }
        walks.push(w);
        per_walk.push(asks);
    }
    let mut walks_merged: Vec<(usize, u64, Ask)> = Vec::new();
    for (i, (w, asks)) in walks.iter().zip(per_walk).enumerate() {
        let closed = w.call.reply.is_closed();
        for (id, ask) in asks {
            if closed {
                // The client left: the walk ends at once (its session goes back as the error left it).
                w.walk.answer(id, Err(Error::Cancelled));
            } else if let Err(e) = engine.check_ask(&ask) {
                w.walk.answer(id, Err(e));
            } else if !going.is_empty() && rows + ask.tokens.len() <= BATCH_INVARIANT_ROWS {
                rows += ask.tokens.len();
                walks_merged.push((i, id, ask));
            } else {
                alone.push(Extra::Walk(i, id, ask));
            }
        }
    }
    if !going.is_empty() {
        let mut decodes: Vec<&mut Decode> = going.iter_mut().map(|r| &mut r.decode).collect();
        let plans: Vec<_> = merged.iter().map(|s| (&s.plan, s.lambda)).collect();
        let asks: Vec<_> = walks_merged
            .iter()
            .map(|(i, _, a)| (a, walks[*i].walk.lambda))
            .collect();
        match engine.feed(&mut decodes, &tokens, &plans, &asks) {
            Ok((rows, answers, ms)) => {
                *running = going;
                hand_out(engine, merged, rows, ms);
                for ((i, id, _), a) in walks_merged.iter().zip(answers) {
                    walks[*i].walk.answer(*id, Ok(a));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for r in going {
                    engine.abandon(r.decode);
                    drop_if_closed(engine, r.closing);
                    engine.after_call();
                    let _ = r.call.reply.send(Err(Error::Internal(msg.clone())));
                }
                for sc in merged {
                    engine.end_score(sc, Err(Error::Internal(msg.clone())));
                }
                for (i, id, _) in &walks_merged {
                    walks[*i].walk.answer(*id, Err(Error::Internal(msg.clone())));
                }
            }
        }
    }
    // The rest share passes of their own, up to the same size (a larger one runs alone).
    for group in pass_groups(alone, Extra::rows) {
        extra_pass(engine, group, &walks);
    }
    // Every walk had its passes answered: each runs on to its next passes or its reply.
    for w in walks {
        go_on(engine, w, walking);
    }
}

/// `items` in order, cut into groups of at most [`BATCH_INVARIANT_ROWS`] rows each (an item larger
/// than that is a group of its own): the passes run outside the decode pass.
pub(super) fn pass_groups<T>(items: Vec<T>, rows: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut groups: Vec<Vec<T>> = Vec::new();
    let mut group_rows = 0;
    for x in items {
        let n = rows(&x);
        match groups.last_mut() {
            Some(g) if group_rows + n <= BATCH_INVARIANT_ROWS => g.push(x),
            _ => {
                groups.push(vec![x]);
                group_rows = 0;
            }
        }
        group_rows += n;
    }
    groups
}

/// A score or a walk's ask (the walk's index in the step, the ask's id) that runs outside the
/// decode pass.
enum Extra {
    Score(Scoring),
    Walk(usize, u64, Ask),
}

impl Extra {
    fn rows(&self) -> usize {
        match self {
            Extra::Score(sc) => sc.plan.rows(),
            Extra::Walk(_, _, ask) => ask.tokens.len(),
        }
    }
}

/// One pass of scores' rows and walks' asks only; the asks are answered in their walks.
fn extra_pass(engine: &mut Engine, group: Vec<Extra>, walks: &[Walking]) {
    let (mut scores, mut asked) = (Vec::new(), Vec::new());
    for x in group {
        match x {
            Extra::Score(sc) => scores.push(sc),
            Extra::Walk(i, id, ask) => asked.push((i, id, ask)),
        }
    }
    let plans: Vec<_> = scores.iter().map(|s| (&s.plan, s.lambda)).collect();
    let asks: Vec<_> = asked.iter().map(|(i, _, a)| (a, walks[*i].walk.lambda)).collect();
    let result = if plans.is_empty() {
        engine.run_asks(&asks).map(|answers| (Vec::new(), answers, 0.0))
    } else {
        engine.chunk_pass(&mut [], &[], &plans, &asks)
    };
    match result {
        Ok((rows, answers, ms)) => {
            hand_out(engine, scores, rows, ms);
            for ((i, id, _), a) in asked.iter().zip(answers) {
                walks[*i].walk.answer(*id, Ok(a));
            }
        }
        Err(e) => {
            let msg = e.to_string();
            for sc in scores {
                engine.end_score(sc, Err(Error::Internal(msg.clone())));
            }
            for (i, id, _) in &asked {
                walks[*i].walk.answer(*id, Err(Error::Internal(msg.clone())));
            }
        }
    }
}

/// Runs a walk on to its next pass (it goes back to `walking`) or its end (it is answered).
fn go_on(engine: &mut Engine, mut w: Walking, walking: &mut Vec<Walking>) {
    match w.walk.poll() {
        None => walking.push(w),
        Some(end) => end_walking(engine, w, end),
    }
}

/// Answers a finished walk; its session goes back (or, closed meanwhile, is dropped).
fn end_walking(engine: &mut Engine, w: Walking, end: WalkEnd) {
    let reply = engine.end_walk(end, w.queue_ms, w.started.elapsed().as_secs_f64() * 1e3);
    drop_if_closed(engine, w.closing);
    engine.after_call();
    let _ = w.call.reply.send(reply);
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

/// Drops the session a close came for while a call held it, once the call has put it back.
fn drop_if_closed(engine: &mut Engine, closing: Option<String>) {
    if let Some(id) = closing {
        engine.sessions.close(&id);
    }
}
