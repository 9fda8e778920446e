//! Walks: the calls that follow token paths through the model one forward pass at a time, with what
//! to do next depending on each pass (`NextCharDistribution`, `NextCharDistributions` and
//! string-prefix `ScoreCandidates`), run as futures that the engine thread polls itself.
//!
//! A walk owns its session while it runs. Its only await point is [`Asker::forward`]: the walk leaves
//! its forward pass (new tokens after a cache) in its slot and waits; the scheduler gathers the
//! waiting walks' passes into the next step beside the running decodes and the scores
//! ([`super::sched`]), answers each slot, and polls the walk again, which then runs on to its next
//! pass or its reply. So the look-ahead forwards of concurrent calls share passes with each other and
//! with the decodes, and a call's walk never holds the engine thread while it waits. Alone (`Engine::run`)
//! a walk is driven the same way with each pass run at once.
//!
//! A walk whose client left ends at its next pass: the pass is answered `CANCELLED`, the error runs
//! up through the walk, and its session goes back (a next-character set cut short is rebuilt by the
//! next call). Nothing here is `Send`: walks and their slots live on the engine thread only.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use candle_core::Tensor;

use super::ops::{MIN_LOGPROB, PREFIX_BACKOFF_BYTES};
use super::session::{After, PrefixCache, Session, Usage};
use super::text::TextCodec;
use super::{ContextSpec, Engine, EngineLimits, Job, Reply};
use crate::chars::{CharOptions, CharState, NextTokenModel};
use crate::error::{Error, Result};
use crate::model::KvCache;

/// A forward pass a walk waits for: `tokens` after the positions of `kv` (kept).
pub(super) struct Ask {
    /// The new tokens.
    pub tokens: Vec<u32>,
    /// The cache they follow.
    pub kv: KvCache,
    /// Logits of every new position (`(n, vocab)`), not only the last (`(vocab,)`).
    pub all: bool,
}

/// The answer to an [`Ask`].
pub(super) struct Answer {
    /// f32 logits: `(vocab,)` after the last token, or `(n, vocab)` with [`Ask::all`].
    pub logits: Tensor,
    /// The cache extended by the new tokens.
    pub kv: KvCache,
    /// Milliseconds of the pass that ran it.
    pub ms: f64,
}

#[derive(Default)]
struct Slot {
    next: u64,
    asks: Vec<(u64, Ask)>,
    answers: std::collections::HashMap<u64, Result<Answer>>,
}

/// A walk's side of its forward passes; the engine holds a clone to take the asks and answer them.
/// A walk may wait for several passes at once (string-prefix scoring walks its candidates side by
/// side): each ask has its id.
#[derive(Clone, Default)]
pub(super) struct Asker(Rc<RefCell<Slot>>);

impl Asker {
    /// Runs `tokens` after `kv` in a pass of the engine's choosing, and waits for it.
    pub(super) async fn forward(&self, tokens: &[u32], kv: &KvCache, all: bool) -> Result<Answer> {
        let id = {
            let mut slot = self.0.borrow_mut();
            let id = slot.next;
            slot.next += 1;
            slot.asks.push((
                id,
                Ask {
                    tokens: tokens.to_vec(),
                    kv: kv.clone(),
                    all,
                },
            ));
            id
        };
        std::future::poll_fn(|_| match self.0.borrow_mut().answers.remove(&id) {
            Some(a) => Poll::Ready(a),
            None => Poll::Pending,
        })
        .await
    }

    /// The passes the walk waits for, in the order asked (taken: each is answered once).
    pub(super) fn take_asks(&self) -> Vec<(u64, Ask)> {
        std::mem::take(&mut self.0.borrow_mut().asks)
    }

    /// Answers the walk's pass `id`.
    pub(super) fn answer(&self, id: u64, a: Result<Answer>) {
        self.0.borrow_mut().answers.insert(id, a);
    }
}

/// What a walk reads: the tokenizer, the limits, and its slot.
pub(super) struct Walker {
    pub(super) codec: Arc<TextCodec>,
    pub(super) limits: EngineLimits,
    pub(super) asker: Asker,
}

/// Next-token probabilities by token sequence.
pub(super) type Memo = std::collections::HashMap<Vec<u32>, Arc<[f32]>>;

/// [`NextTokenModel`] over a session's prefix cache: each call is one forward pass of the positions
/// the cache lacks.
pub(super) struct CachedModel<'a> {
    pub(super) asker: &'a Asker,
    pub(super) cache: &'a mut PrefixCache,
    pub(super) usage: &'a mut Usage,
    /// Next-token probabilities already computed for these token sequences (one batched pass over a
    /// continuation's canonical path), looked up before the cache.
    pub(super) memo: Option<&'a Memo>,
}

impl NextTokenModel for CachedModel<'_> {
    type Error = Error;

    async fn next_probs(&mut self, tokens: &[u32]) -> Result<Arc<[f32]>> {
        if let Some(p) = self.memo.and_then(|m| m.get(tokens)) {
            self.usage.reused_positions += tokens.len();
            return Ok(p.clone());
        }
        let (cache, usage) = (RefCell::new(&mut *self.cache), RefCell::new(&mut *self.usage));
        let mut shared = SharedModel {
            asker: self.asker,
            cache: &cache,
            usage: &usage,
        };
        shared.next_probs(tokens).await
    }
}

/// [`NextTokenModel`] over a session's prefix cache shared by several walks of one call side by side
/// (and behind [`CachedModel`]): each call is one pass of the positions the cache lacks, run by the
/// engine ([`PrefixCache::lookup_after`], then [`PrefixCache::store_after`]); the cache and the
/// counters are borrowed only between passes, never across one.
struct SharedModel<'a, 'c> {
    asker: &'a Asker,
    cache: &'a RefCell<&'c mut PrefixCache>,
    usage: &'a RefCell<&'c mut Usage>,
}

impl NextTokenModel for SharedModel<'_, '_> {
    type Error = Error;

    async fn next_probs(&mut self, tokens: &[u32]) -> Result<Arc<[f32]>> {
        let after = self
            .cache
            .borrow_mut()
            .lookup_after(tokens, &mut self.usage.borrow_mut())?;
        let logits = match after {
            After::Known(logits, _) => logits,
            After::Compute { start, kv } => {
                let a = self.asker.forward(&tokens[start..], &kv, false).await?;
                let (logits, _) = self.cache.borrow_mut().store_after(
                    tokens,
                    start,
                    a.logits,
                    a.kv,
                    a.ms,
                    &mut self.usage.borrow_mut(),
                );
                logits
            }
        };
        let probs = candle_nn::ops::softmax_last_dim(&logits)?.to_vec1::<f32>()?;
        Ok(probs.into())
    }
}

/// Every future's output, in order, polling each unfinished one at every poll (the engine polls
/// with a no-op waker, so nothing may wait for a wake-up).
async fn join_every<F: Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut outs: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        for (f, out) in futs.iter_mut().zip(outs.iter_mut()) {
            if out.is_none()
                && let Poll::Ready(v) = f.as_mut().poll(cx)
            {
                *out = Some(v);
            }
        }
        if outs.iter().all(Option::is_some) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    outs.into_iter().flatten().collect()
}

/// How a walk ends: its session (to put back), its work, its reply.
pub(super) struct WalkEnd {
    pub(super) session: Session,
    pub(super) usage: Usage,
    pub(super) reply: Result<Reply>,
}

/// A walk in progress.
pub(super) struct Walk {
    fut: Pin<Box<dyn Future<Output = WalkEnd>>>,
    asker: Asker,
    /// RTD: the call's λ, for every pass of the walk.
    pub(super) lambda: Option<f64>,
    /// The id of the session it holds ("" for a one-off context).
    pub(super) session: String,
}

impl Walk {
    /// Runs the walk on to its next passes (`None`: it waits, [`Walk::take_asks`] says for what) or
    /// its end.
    pub(super) fn poll(&mut self) -> Option<WalkEnd> {
        match self.fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(end) => Some(end),
            Poll::Pending => None,
        }
    }

    /// The passes the walk waits for (taken), with their ids.
    pub(super) fn take_asks(&self) -> Vec<(u64, Ask)> {
        self.asker.take_asks()
    }

    /// Answers the walk's pass `id`.
    pub(super) fn answer(&self, id: u64, a: Result<Answer>) {
        self.asker.answer(id, a);
    }
}

/// Whether a job is a walk.
pub(super) fn is_walk(job: &Job) -> bool {
    matches!(job, Job::NextChar(..) | Job::NextChars(..) | Job::ScorePrefix(..))
}

impl Engine {
    /// Resolves a walk's context into its session and makes the walk (not polled yet).
    pub(super) fn begin_walk(&mut self, job: Job) -> Result<Walk> {
        let ctx: ContextSpec = match &job {
            Job::NextChar(c, ..) | Job::NextChars(c, _) | Job::ScorePrefix(c, ..) => c.clone(),
            _ => return Err(Error::Internal("not a walk".into())),
        };
        let lambda = ctx.rtd_lambda;
        let id = ctx.session.clone();
        let mut session = self.resolve(ctx)?;
        let asker = Asker::default();
        let w = Walker {
            codec: self.codec.clone(),
            limits: self.limits.clone(),
            asker: asker.clone(),
        };
        let fut = async move {
            let mut usage = Usage {
                context_tokens: session.tokens.len(),
                ..Usage::default()
            };
            let s = &mut session;
            let reply = match job {
                Job::NextChar(_, k, o) => w.next_char(s, k, &o, &mut usage).await.map(Reply::Chars),
                Job::NextChars(_, p) => w.next_chars(s, &p, &mut usage).await.map(Reply::CharRun),
                Job::ScorePrefix(_, c, ends, o) => w
                    .score_prefix(s, &c, &ends, &o, &mut usage)
                    .await
                    .map(Reply::Scores),
                _ => Err(Error::Internal("not a walk".into())),
            };
            WalkEnd {
                session,
                usage,
                reply,
            }
        };
        Ok(Walk {
            fut: Box::pin(fut),
            asker,
            lambda,
            session: id,
        })
    }

    /// Whether an ask can run in a shared pass: a walk's own error (a path past the model's
    /// positions) must reach that walk alone, never fail the pass it would share.
    pub(super) fn check_ask(&self, ask: &Ask) -> Result<()> {
        if ask.tokens.is_empty() {
            return Err(Error::Internal("a walk asked for a pass of no tokens".into()));
        }
        let limit = self.model.max_positions();
        if ask.kv.len() + ask.tokens.len() > limit {
            return Err(Error::ContextTooLong {
                tokens: ask.kv.len(),
                new_tokens: ask.tokens.len(),
                limit,
            });
        }
        Ok(())
    }

    /// Runs a walk to its end on the calling thread, the passes it waits for at once together (in
    /// passes of up to [`BATCH_INVARIANT_ROWS`] rows; a longer one alone).
    pub(super) fn drive(&mut self, mut walk: Walk) -> Result<WalkEnd> {
        loop {
            if let Some(end) = walk.poll() {
                return Ok(end);
            }
            let asks = walk.take_asks();
            if asks.is_empty() {
                // Cannot happen: a walk waits only in `Asker::forward`, which leaves its ask.
                return Err(Error::Internal("a walk waited with no pass to run".into()));
            }
            for group in super::sched::pass_groups(asks, |(_, a)| a.tokens.len()) {
                self.answer_group(&walk, group);
            }
        }
    }

    /// Runs one group of a walk's asks in one pass and answers them.
    fn answer_group(&mut self, walk: &Walk, group: Vec<(u64, Ask)>) {
        let asks: Vec<_> = group.iter().map(|(_, a)| (a, walk.lambda)).collect();
        match self.run_asks(&asks) {
            Ok(answers) => {
                for ((id, _), a) in group.iter().zip(answers) {
                    walk.answer(*id, Ok(a));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for (id, _) in &group {
                    walk.answer(*id, Err(Error::Internal(msg.clone())));
                }
            }
        }
    }

    /// Puts a finished walk's session back, counts its work, and gives its reply the call's times.
    pub(super) fn end_walk(&mut self, end: WalkEnd, queue_ms: f64, compute_ms: f64) -> Result<Reply> {
        let WalkEnd {
            session,
            usage,
            reply,
        } = end;
        self.count_work(&usage);
        self.sessions.put(session);
        let usage = Usage {
            queue_ms,
            compute_ms,
            ..usage
        };
        reply.map(|r| match r {
            Reply::Chars(mut c) => {
                c.usage = usage;
                Reply::Chars(c)
            }
            Reply::CharRun(mut c) => {
                c.usage = usage;
                Reply::CharRun(c)
            }
            Reply::Scores(mut c) => {
                c.usage = usage;
                Reply::Scores(c)
            }
            other => other,
        })
    }
}

impl Walker {
    /// The canonical tokens of the context with `cand` appended to the answer; past the context
    /// limit the client's to shorten.
    pub(super) fn with_candidate(&self, s: &Session, cand: &str) -> Result<Vec<u32>> {
        super::ops::with_candidate(&self.codec, &self.limits, s, cand)
    }

    /// Scores every candidate as a string prefix ([`CharState::prefix_mass`]): one hypothesis set
    /// for the context, committed through each candidate; a candidate that ends inside a token is
    /// priced by every token path that spells it. A candidate flagged in `ends` is priced as the
    /// whole rest of the answer ([`CharState::end_mass`]). `token_count` is the canonical
    /// tokenization's (plus one for the end).
    pub(super) async fn score_prefix(
        &self,
        s: &mut Session,
        candidates: &[String],
        ends: &[bool],
        opts: &CharOptions,
        usage: &mut Usage,
    ) -> Result<super::Scores> {
        let heal = self.codec.heal(&s.tokens, Engine::text_empty(s));
        // Back off further, to whole tokens covering at least PREFIX_BACKOFF_BYTES of text: a
        // draft often continues a word the context's canonical tokens split where the model never
        // would ("</thi" + "nk>" is "</" + "think" + ">", not "</" + "th" + "ink" + ">"), and the
        // hypotheses then explore every tokenization of that stretch, not just the last token's.
        let (mut plen, mut remainder) = (heal.prefix_len, heal.remainder.clone());
        while plen > 1 && remainder.len() < PREFIX_BACKOFF_BYTES {
            match self.codec.vocab.token_bytes(s.tokens[plen - 1]) {
                Some(b) if !b.is_empty() => {
                    let mut r = b.to_vec();
                    r.extend_from_slice(&remainder);
                    remainder = r;
                    plen -= 1;
                }
                _ => break, // a special token (template marker, BOS): not text
            }
        }
        let mut out = Vec::with_capacity(candidates.len());
        for cand in candidates {
            let full = self.with_candidate(s, cand)?;
            out.push(super::CandidateScore {
                sum_logprob: 0.0,
                token_count: full.len().saturating_sub(heal.prefix_len),
                char_count: cand.chars().count(),
            });
        }
        let vocab = &self.codec.vocab;
        let opts = CharOptions {
            lookahead: true,
            ..opts.clone()
        };
        let base = {
            let mut m = CachedModel {
                asker: &self.asker,
                cache: &mut s.cache,
                usage: &mut *usage,
                memo: None,
            };
            CharState::new(s.tokens[..plen].to_vec(), remainder, opts, vocab, &mut m).await?
        };
        let base_mass = base.prefix_mass(vocab);
        // The candidates' walks side by side: their passes join the same steps (one pass for the
        // candidates' rows at each depth, not one after another).
        let cache = RefCell::new(&mut s.cache);
        let counted = RefCell::new(&mut *usage);
        let walks: Vec<_> = candidates
            .iter()
            .map(|cand| {
                let mut st = base.clone();
                let mut m = SharedModel {
                    asker: &self.asker,
                    cache: &cache,
                    usage: &counted,
                };
                async move { st.commit(cand, vocab, &mut m).await.map(|()| st) }
            })
            .collect();
        let states = join_every(walks).await;
        for (k, (score, st)) in out.iter_mut().zip(states).enumerate() {
            let st = st?;
            let ends_here = ends.get(k).copied().unwrap_or(false);
            let mass = if ends_here {
                score.token_count += 1;
                st.end_mass(vocab)
            } else {
                st.prefix_mass(vocab)
            };
            score.sum_logprob = if mass > 0.0 && base_mass > 0.0 {
                (mass / base_mass).ln().max(MIN_LOGPROB)
            } else {
                MIN_LOGPROB
            };
        }
        Ok(super::Scores {
            scores: out,
            usage: Usage::default(),
        })
    }
}
