//! Proposals as resumable decodes, stepped by the scheduler ([`super::sched`]).
//!
//! A [`Decode`] holds one `ProposeSegment` between tokens: its session, its KV cache, the logits of
//! its next position and what it has produced. [`Engine::start_decode`] resolves and prefills it,
//! [`Engine::pick`] chooses its next token, [`Engine::feed`] runs one token of every running decode
//! (and the rows of waiting scores) in one batched pass, [`Engine::finish_decode`] ends it.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::ops::{Finish, Proposal, ProposeParams, ScorePlan, log_sum_exp};
use super::session::{Session, Usage};
use super::text::text_of;
use super::walk::{Answer, Ask};
use super::{ContextSpec, Engine};
use crate::error::{Error, Result};
use crate::model::KvCache;
use crate::sampling::Sampler;

/// One proposal between two tokens.
pub(super) struct Decode {
    session: Session,
    usage: Usage,
    params: ProposeParams,
    /// Context bytes the first token must re-cover (token healing).
    remainder: Vec<u8>,
    /// Drop one leading space from the text (an empty context under a SentencePiece tokenizer).
    strip_space: bool,
    /// Tokens conditioned on so far (context prefix + sampled).
    seq: Vec<u32>,
    kv: KvCache,
    /// Logits of the next position.
    logits: Vec<f32>,
    /// Deferral logits (one per head) of the next position, when the node has deferral heads.
    deferral: Option<Vec<f32>>,
    /// RTD: the request's λ (`None`: the node's).
    rtd_lambda: Option<f64>,
    /// Deferral probability of each position decided so far (with a threshold only).
    defer_probs: Vec<f32>,
    /// Each head's probability where it deferred.
    defer_head_probs: Vec<f32>,
    sampler: Sampler,
    bytes: Vec<u8>,
    logprobs: Vec<f32>,
    text: String,
    step: usize,
    /// Tokens this decode may sample: `max_new_tokens`, plus the healing token when the first token
    /// re-covers the backed-off end of the context (it re-spells context text, so it is not new).
    limit: usize,
    /// KV bytes this decode may grow to (context + new tokens).
    pub(super) reserved: usize,
}

/// What [`Engine::start_decode`] made of a proposal.
pub(super) enum Start {
    /// Running: ready for its first token.
    Run(Box<Decode>),
    /// Fits the KV budget, not beside the running decodes: wait, needing these bytes.
    Wait(usize),
}

/// What a decode does after picking a token.
pub(super) enum Next {
    /// Run this token through the model and pick again.
    Feed(u32),
    /// Finished.
    Done(Finish),
}

impl Decode {
    /// The id of the session it runs on ("" for a one-off context).
    pub(super) fn session_id(&self) -> &str {
        &self.session.id
    }

    /// The cache its next token follows.
    pub(super) fn kv(&self) -> &KvCache {
        &self.kv
    }

    /// Its RTD λ.
    pub(super) fn rtd_lambda(&self) -> Option<f64> {
        self.rtd_lambda
    }

    /// Takes a step's results: the next position's logits and deferral logits, the extended cache.
    pub(super) fn advance(&mut self, logits: Vec<f32>, kv: KvCache, deferral: Option<Vec<f32>>) {
        (self.logits, self.kv, self.deferral) = (logits, kv, deferral);
    }
}

/// σ(x) in f32.
fn sigmoid(x: f32) -> f32 {
    crate::deferral::sigmoid(f64::from(x)) as f32
}

impl Engine {
    /// KV bytes one position costs over all layers.
    pub(super) fn kv_bytes_per_position(&self) -> usize {
        let c = self.model.config();
        2 * c.num_layers * c.num_kv_heads * c.head_dim * self.model.dtype().size_in_bytes()
    }

    /// Resolves the context, checks the limits, and runs the prompt (the part no cache holds): a
    /// decode ready for its first token, or [`Start::Wait`] with the bytes it needs when it fits the
    /// KV budget but not beside the `held` bytes of the running decodes (with none running it always
    /// starts).
    pub(super) fn start_decode(
        &mut self,
        ctx: ContextSpec,
        mut params: ProposeParams,
        held: usize,
    ) -> Result<Start> {
        if params.defer_threshold.is_some() && self.model.deferral_heads() == 0 {
            return Err(Error::InvalidArgument(
                "defer_threshold is set but this node has no deferral head: start it with --deferral-head FILE \
                 (trained by `ensemble-train deferral`), or leave defer_threshold unset"
                    .into(),
            ));
        }
        let rtd_lambda = ctx.rtd_lambda;
        let mut session = self.resolve(ctx)?;
        let tokens = session.tokens.len();
        let text_empty = Self::text_empty(&session);
        let mut heal = self.codec.heal(&session.tokens, text_empty);
        // An empty text constrains nothing: the first token is free, and the leading space a
        // SentencePiece decoder strips is stripped from the text (as HF's `decode` does), not forced
        // on the model (tinystories656K starts its stories with `On`, not `▁On`).
        let strip_space = text_empty && heal.remainder == b" ";
        if strip_space {
            heal.remainder.clear();
        }
        // The context limit comes first: the draft stops there with LENGTH (resolve refused a
        // context with no room left).
        params.max_new_tokens = params
            .max_new_tokens
            .min(self.limits.max_context.saturating_sub(tokens))
            .max(1);
        // The context, the healing token and every new one: the KV bytes admission counts, and the
        // room the decode's cache takes at once (no copy as it grows).
        let positions = tokens + params.max_new_tokens + 1;
        let reserved = positions * self.kv_bytes_per_position();
        let budget = self.limits.kv_budget_bytes;
        if reserved > budget {
            self.sessions.put(session);
            return Err(Error::KvBudget {
                need: reserved,
                budget,
            });
        }
        if held > 0 && held + reserved > budget {
            self.sessions.put(session);
            return Ok(Start::Wait(reserved));
        }
        let mut usage = Usage {
            context_tokens: tokens,
            ..Usage::default()
        };
        let seq: Vec<u32> = session.tokens[..heal.prefix_len].to_vec();
        self.model.set_rtd_lambdas(rtd_lambda.map(|l| vec![Some(l)]));
        let prefilled = session
            .cache
            .logits_after(&self.model, &seq, &mut usage)
            .and_then(|(l, kv)| Ok((l.to_vec1::<f32>()?, self.model.reserve(&kv, positions)?)));
        self.model.set_rtd_lambdas(None);
        let (logits, kv) = match prefilled {
            Ok(x) => x,
            Err(e) => {
                self.sessions.put(session);
                return Err(e);
            }
        };
        // The first position's deferral logits: the prefill keeps no hidden state, so its last token
        // runs once more (one position, attending to the cache without writing it). Not needed when
        // the first token heals (a healing step never defers) or without a threshold.
        let mut deferral = None;
        if params.defer_threshold.is_some()
            && heal.remainder.is_empty()
            && let Some((&last, _)) = seq.split_last()
        {
            let t0 = Instant::now();
            let d = kv
                .truncate(seq.len() - 1)
                .and_then(|before| self.model.deferral_after(last, &before))
                .and_then(|d| d.map(|d| d.to_vec1::<f32>()).transpose());
            match d {
                Ok(d) => deferral = d,
                Err(e) => {
                    self.sessions.put(session);
                    return Err(e.into());
                }
            }
            usage.forward_ms += t0.elapsed().as_secs_f64() * 1e3;
            usage.computed_positions += 1;
            usage.forward_passes += 1;
        }
        let seed = session.answer_chars as u64 ^ (tokens as u64).rotate_left(32);
        let params_limit = params.max_new_tokens + usize::from(!heal.remainder.is_empty());
        Ok(Start::Run(Box::new(Decode {
            sampler: Sampler::new(params.sampling.clone(), seed),
            reserved,
            session,
            usage,
            params,
            remainder: heal.remainder,
            strip_space,
            seq,
            kv,
            logits,
            deferral,
            rtd_lambda,
            defer_probs: Vec::new(),
            defer_head_probs: Vec::new(),
            bytes: Vec::new(),
            logprobs: Vec::new(),
            text: String::new(),
            step: 0,
            limit: params_limit,
        })))
    }

    /// Picks the next token from the decode's logits.
    pub(super) fn pick(&self, d: &mut Decode) -> Next {
        if d.step >= d.limit {
            return Next::Done(Finish::Length);
        }
        let vocab = &self.codec.vocab;
        let healing = d.step == 0 && !d.remainder.is_empty();
        if let Some(eta) = d.params.defer_threshold {
            // Co-LLM: decide before picking. A healing step re-spells the context's backed-off last
            // token (text the ensemble already accepted), so it never defers; it reports 0.
            let probs: Vec<f32> = match (&d.deferral, healing) {
                (Some(z), false) => z.iter().map(|&z| sigmoid(z)).collect(),
                _ => vec![],
            };
            let p = probs.iter().copied().fold(0.0f32, f32::max);
            d.defer_probs.push(p);
            if f64::from(p) > eta {
                d.defer_head_probs = probs;
                return Next::Done(Finish::Defer);
            }
        }
        let healed: Vec<u32>;
        let candidates: &[u32] = if healing {
            let mut ids: Vec<u32> = vocab
                .prefix_range(&d.remainder)
                .map(|pos| vocab.sorted_id(pos))
                .collect();
            // Co-LLM: the healing token re-spells the accepted text and writes nothing past it, so
            // every new character gets a deferral decision (a token running past the end of an
            // assistant's handoff would write the base's next characters unchecked).
            if d.params.defer_threshold.is_some() {
                let exact: Vec<u32> = ids
                    .iter()
                    .copied()
                    .filter(|&t| vocab.token_bytes(t) == Some(d.remainder.as_slice()))
                    .collect();
                if !exact.is_empty() {
                    ids = exact;
                }
            }
            ids.sort_unstable();
            healed = ids;
            &healed
        } else {
            &self.text_ids
        };
        let Some(tok) = d.sampler.pick(&d.logits, candidates) else {
            d.defer_probs.truncate(d.logprobs.len());
            return Next::Done(Finish::Length);
        };
        let lse = log_sum_exp(&d.logits, None);
        let mut lp = d.logits[tok as usize] - lse;
        if healing {
            lp -= log_sum_exp(&d.logits, Some(candidates)) - lse;
        }
        d.logprobs.push(lp);
        d.step += 1;
        if vocab.is_eos(tok) {
            return Next::Done(Finish::Eos);
        }
        d.seq.push(tok);
        d.bytes
            .extend_from_slice(vocab.token_bytes(tok).unwrap_or_default());
        let body = d.bytes.get(d.remainder.len()..).unwrap_or_default();
        let body = match body.strip_prefix(b" ") {
            Some(rest) if d.strip_space => rest,
            _ => body,
        };
        d.text = text_of(body);
        if let Some(cut) = d
            .params
            .stop
            .iter()
            .filter_map(|st| d.text.find(st.as_str()))
            .min()
        {
            d.text.truncate(cut);
            return Next::Done(Finish::Stop);
        }
        if d.step >= d.limit {
            return Next::Done(Finish::Length);
        }
        Next::Feed(tok)
    }

    /// Runs one token of each decode through the model in one batched pass, with the candidates'
    /// rows of `scores` and the walks' `asks` (each with its λ) when given; returns those rows, the
    /// asks' answers and the pass's ms.
    pub(super) fn feed(
        &mut self,
        decodes: &mut [&mut Decode],
        tokens: &[u32],
        scores: &[(&ScorePlan, Option<f64>)],
        asks: &[(&Ask, Option<f64>)],
    ) -> Result<(Vec<Vec<f32>>, Vec<Answer>, f64)> {
        let (rows, answers, ms) = self.chunk_pass(decodes, tokens, scores, asks)?;
        for d in decodes.iter_mut() {
            d.usage.computed_positions += 1;
            d.usage.forward_passes += 1;
            d.usage.forward_ms += ms;
        }
        if !decodes.is_empty() {
            self.totals.batched_steps.fetch_add(1, Ordering::Relaxed);
            self.totals
                .batched_rows
                .fetch_add(tokens.len() as u64, Ordering::Relaxed);
            let merged: usize = scores.iter().map(|(p, _)| p.rows()).sum();
            self.totals
                .merged_score_rows
                .fetch_add(merged as u64, Ordering::Relaxed);
            let walked: usize = asks.iter().map(|(a, _)| a.tokens.len()).sum();
            self.totals
                .merged_walk_rows
                .fetch_add(walked as u64, Ordering::Relaxed);
        }
        Ok((rows, answers, ms))
    }

    /// Ends a decode: its draft's KV entries stay cached (appending the same text later is free), the
    /// session goes back, the counters move.
    pub(super) fn finish_decode(&mut self, mut d: Decode, finish: Finish) -> (Proposal, Usage) {
        // The cache covers every token but the last sampled one.
        let covered = d.kv.len().min(d.seq.len());
        d.session.cache.insert(d.seq[..covered].to_vec(), d.kv, None);
        self.totals
            .computed_positions
            .fetch_add(d.usage.computed_positions as u64, Ordering::Relaxed);
        self.totals
            .forward_passes
            .fetch_add(d.usage.forward_passes as u64, Ordering::Relaxed);
        self.sessions.put(d.session);
        let proposal = Proposal {
            text: d.text,
            token_logprobs: d.logprobs,
            finish,
            defer_probs: d.defer_probs,
            defer_head_probs: d.defer_head_probs,
            usage: Usage::default(),
        };
        (proposal, d.usage)
    }

    /// Drops a decode that failed or whose client left; the session goes back.
    pub(super) fn abandon(&mut self, d: Decode) {
        self.sessions.put(d.session);
    }

    /// Runs a proposal to its end on the calling thread (a batch of one).
    pub(super) fn propose_now(
        &mut self,
        ctx: ContextSpec,
        params: ProposeParams,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(Proposal, Usage)> {
        let Start::Run(d) = self.start_decode(ctx, params, 0)? else {
            return Err(Error::Internal("a lone proposal was asked to wait".into()));
        };
        let mut d = *d;
        loop {
            if cancelled() {
                self.abandon(d);
                return Err(Error::Cancelled);
            }
            match self.pick(&mut d) {
                Next::Done(finish) => return Ok(self.finish_decode(d, finish)),
                Next::Feed(tok) => {
                    if let Err(e) = self.feed(&mut [&mut d], &[tok], &[], &[]) {
                        self.abandon(d);
                        return Err(e);
                    }
                }
            }
        }
    }
}
