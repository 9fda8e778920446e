//! Resolving a context into a session, and scoring candidates on it (one batched pass over the shared
//! context cache, or as string prefixes). The next-character questions are in [`super::nextchar`];
//! proposals are decodes stepped together by the scheduler ([`super::decode`]).

use candle_core::{D, Tensor};

use super::session::{Session, Usage};
use super::text::TextCodec;
use super::walk::{Answer, Ask};
use super::{ContextBody, ContextSpec, Engine, EngineLimits};
use crate::error::{Error, Result};
use crate::model::{BATCH_INVARIANT_ROWS, Chunk};
use crate::sampling::SamplingParams;

/// Settings of a proposal.
#[derive(Debug, Clone, PartialEq)]
pub struct ProposeParams {
    /// Most new tokens.
    pub max_new_tokens: usize,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Co-LLM: stop before the first token whose deferral probability (the highest over the node's
    /// heads) exceeds this threshold in (0, 1) ([`Finish::Defer`]). `None`: no deferral.
    pub defer_threshold: Option<f64>,
}

/// Why a proposal ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// End-of-sequence token.
    Eos,
    /// Token limit.
    Length,
    /// Stop string.
    Stop,
    /// Co-LLM: the deferral head asked to hand the next token to an assistant.
    Defer,
}

/// A drafted segment.
#[derive(Debug, Clone)]
pub struct Proposal {
    /// New text.
    pub text: String,
    /// Log-probability of each generated token.
    pub token_logprobs: Vec<f32>,
    /// Why it ended.
    pub finish: Finish,
    /// With a deferral threshold: the deferral probability (highest over the heads) at each position
    /// decided (one per token log-probability; 0 at a healing step, which never defers), plus the
    /// position deferred at when it ended with [`Finish::Defer`].
    pub defer_probs: Vec<f32>,
    /// With [`Finish::Defer`]: each head's probability at the position deferred at.
    pub defer_head_probs: Vec<f32>,
    /// Work done.
    pub usage: Usage,
}

/// The score of one candidate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CandidateScore {
    /// Sum of token log-probabilities, healing-corrected.
    pub sum_logprob: f64,
    /// Tokens.
    pub token_count: usize,
    /// Characters.
    pub char_count: usize,
}

impl CandidateScore {
    /// Mean log-probability per token (0 for an empty candidate).
    pub fn mean(&self) -> f64 {
        if self.token_count == 0 {
            0.0
        } else {
            self.sum_logprob / self.token_count as f64
        }
    }
}

/// Scores in candidate order.
#[derive(Debug, Clone)]
pub struct Scores {
    /// One per candidate.
    pub scores: Vec<CandidateScore>,
    /// Work done.
    pub usage: Usage,
}

/// A score between its preparation ([`Engine::score_plan`]) and its candidates' batched rows.
pub(super) struct ScorePlan {
    /// Scores so far (the candidates scored on their own are final).
    out: Vec<CandidateScore>,
    /// The batched candidates: index, tokens after the healed prefix, the first token's
    /// log-probability (from the context's logits).
    batch: Vec<(usize, Vec<u32>, f64)>,
    /// log P(healed-away text), subtracted from every candidate.
    heal_lp: f64,
    /// The context's cache up to the healed prefix (read by the candidates' rows, never written).
    kv: crate::model::KvCache,
}

impl ScorePlan {
    /// Positions the candidates' pass computes: every token of a batched candidate but its first.
    pub(super) fn rows(&self) -> usize {
        self.batch.iter().map(|(_, t, _)| t.len() - 1).sum()
    }

    /// The candidates' chunks of a [`Transformer::forward_chunks`](crate::model::Transformer::forward_chunks) step, in order.
    pub(super) fn chunks(&self) -> impl Iterator<Item = Chunk<'_>> {
        self.batch
            .iter()
            .filter(|(_, t, _)| t.len() > 1)
            .map(|(_, t, _)| Chunk {
                tokens: &t[..t.len() - 1],
                cache: &self.kv,
                keep: false,
            })
    }

    /// The scores, from the logits of the rows of [`ScorePlan::chunks`] (in order).
    pub(super) fn finish(self, rows: &[Vec<f32>]) -> Scores {
        let mut out = self.out;
        let mut rows = rows.iter();
        for (i, toks, first) in self.batch {
            let rest: f64 = toks[1..]
                .iter()
                .zip(rows.by_ref())
                .map(|(&t, row)| f64::from(log_prob(row, t)))
                .sum();
            out[i].sum_logprob = first + rest - self.heal_lp;
            out[i].token_count = toks.len();
        }
        Scores {
            scores: out,
            usage: Usage::default(),
        }
    }
}

/// log softmax(`row`)[`t`], in f32.
fn log_prob(row: &[f32], t: u32) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
    row.get(t as usize)
        .map_or(f32::NEG_INFINITY, |&x| x - max - sum.ln())
}

impl Engine {
    /// Finds or builds the session for a context and brings its tokens up to date.
    pub(super) fn resolve(&mut self, ctx: ContextSpec) -> Result<Session> {
        let mut session = match ctx.body {
            ContextBody::Full { prompt, answer } => {
                let rendered = self.codec.render(&prompt)?;
                let old = if ctx.session.is_empty() {
                    None
                } else {
                    self.sessions.take(&ctx.session)
                };
                match old {
                    // Same prompt and the answer only grew: a delta in disguise, keep everything.
                    Some(mut s) if s.prompt == rendered && answer.starts_with(&s.answer) => {
                        let added = &answer[s.answer.len()..];
                        s.chars_pending.push_str(added);
                        s.answer_chars += added.chars().count();
                        s.answer = answer;
                        s
                    }
                    // Anything else: new context, but keep the KV caches (longest common prefix wins).
                    Some(mut s) => {
                        s.prompt = rendered;
                        s.answer_chars = answer.chars().count();
                        s.answer = answer;
                        s.chars = None;
                        s.chars_pending.clear();
                        s
                    }
                    None => {
                        let mut s = Session::new(ctx.session.clone(), rendered);
                        s.answer_chars = answer.chars().count();
                        s.answer = answer;
                        s
                    }
                }
            }
            ContextBody::Delta { base_chars, append } => {
                let mut s = self
                    .sessions
                    .take(&ctx.session)
                    .ok_or_else(|| Error::SessionNotFound(ctx.session.clone()))?;
                if s.answer_chars as u64 != base_chars {
                    let err = Error::SessionMismatch {
                        session: s.id.clone(),
                        have: s.answer_chars,
                        got: base_chars,
                    };
                    self.sessions.put(s);
                    return Err(err);
                }
                s.answer.push_str(&append);
                s.answer_chars += append.chars().count();
                s.chars_pending.push_str(&append);
                s
            }
        };
        let tokens = match self.codec.encode(&session.prompt, &session.answer) {
            Ok(t) => t,
            Err(e) => {
                self.sessions.put(session);
                return Err(e);
            }
        };
        if tokens.is_empty() {
            return Err(Error::InvalidArgument(
                "empty context: this tokenizer has no BOS token, so give a non-empty prompt".into(),
            ));
        }
        if tokens.len() >= self.limits.max_context {
            let err = Error::ContextTooLong {
                tokens: tokens.len(),
                new_tokens: 0,
                limit: self.limits.max_context,
            };
            // The session is not kept: it can never be used again.
            return Err(err);
        }
        session.tokens = tokens;
        Ok(session)
    }

    pub(super) fn text_empty(s: &Session) -> bool {
        s.prompt.text.is_empty() && s.answer.is_empty()
    }

    /// Scores every candidate as a continuation of the answer: [`Engine::score_plan`], the
    /// candidates' rows in one pass of their own ([`Engine::chunk_pass`]), [`ScorePlan::finish`].
    /// The scheduler instead runs the rows inside a decode step when they fit.
    pub(super) fn score(
        &mut self,
        s: &mut Session,
        candidates: &[String],
        usage: &mut Usage,
    ) -> Result<Scores> {
        let plan = self.score_plan(s, candidates, usage)?;
        if plan.rows() == 0 {
            return Ok(plan.finish(&[]));
        }
        let (rows, _, ms) = self.chunk_pass(&mut [], &[], &[(&plan, None)], &[])?;
        usage.forward_ms += ms;
        usage.forward_passes += 1;
        usage.computed_positions += plan.rows();
        Ok(plan.finish(&rows))
    }

    /// Everything of a score before the candidates' own positions run: the context's logits (the
    /// first token of every candidate), the healing correction, the candidates' tokens. Candidates
    /// whose tokenization keeps the context's healed prefix are left for one batched pass over the
    /// shared context cache; the rare others are scored here, on their own.
    pub(super) fn score_plan(
        &mut self,
        s: &mut Session,
        candidates: &[String],
        usage: &mut Usage,
    ) -> Result<ScorePlan> {
        let heal = self.codec.heal(&s.tokens, Self::text_empty(s));
        let plen = heal.prefix_len;
        let prefix = s.tokens[..plen].to_vec();
        let (ctx_logits, kv) = s.cache.logits_after(&self.model, &prefix, usage)?;
        let ctx_lp = candle_nn::ops::log_softmax(&ctx_logits, D::Minus1)?.to_vec1::<f32>()?;
        let vocab = &self.codec.vocab;
        let heal_lp = if heal.remainder.is_empty() {
            0.0
        } else {
            let ids: Vec<u32> = vocab
                .prefix_range(&heal.remainder)
                .map(|p| vocab.sorted_id(p))
                .collect();
            log_sum_exp(&ctx_lp, Some(&ids)) as f64
        };
        let mut out = vec![
            CandidateScore {
                sum_logprob: 0.0,
                token_count: 0,
                char_count: 0
            };
            candidates.len()
        ];
        let mut batch: Vec<(usize, Vec<u32>, f64)> = Vec::new();
        for (i, cand) in candidates.iter().enumerate() {
            let full = self.with_candidate(s, cand)?;
            out[i].char_count = cand.chars().count();
            if full.len() > plen && full[..plen] == prefix[..] {
                let toks = full[plen..].to_vec();
                let first = f64::from(ctx_lp[toks[0] as usize]);
                batch.push((i, toks, first));
            } else {
                out[i] = self.score_alone(s, &prefix, &full, heal_lp, usage)?;
                out[i].char_count = cand.chars().count();
            }
        }
        Ok(ScorePlan {
            out,
            batch,
            heal_lp,
            kv,
        })
    }

    /// One forward pass of decode rows (`tokens[i]` after `decodes[i]`'s cache, kept), the
    /// candidates' rows of score plans and the walks' asked positions (each with its RTD λ), all in
    /// one [`Transformer::forward_chunks`](crate::model::Transformer::forward_chunks) step. The decodes get their logits, deferral logits and
    /// extended caches; returns each plan's rows of logits in order, each ask's answer, and the
    /// pass's milliseconds.
    pub(super) fn chunk_pass(
        &mut self,
        decodes: &mut [&mut super::decode::Decode],
        tokens: &[u32],
        plans: &[(&ScorePlan, Option<f64>)],
        asks: &[(&Ask, Option<f64>)],
    ) -> Result<(Vec<Vec<f32>>, Vec<Answer>, f64)> {
        let t0 = std::time::Instant::now();
        let mut chunks = Vec::with_capacity(decodes.len() + plans.len() + asks.len());
        let mut lambdas = Vec::with_capacity(decodes.len());
        for (d, t) in decodes.iter().zip(tokens) {
            chunks.push(Chunk {
                tokens: std::slice::from_ref(t),
                cache: d.kv(),
                keep: true,
            });
            lambdas.push(d.rtd_lambda());
        }
        for (plan, lambda) in plans {
            for c in plan.chunks() {
                lambdas.extend(std::iter::repeat_n(*lambda, c.tokens.len()));
                chunks.push(c);
            }
        }
        let plan_chunks = chunks.len() - decodes.len();
        for (ask, lambda) in asks {
            lambdas.extend(std::iter::repeat_n(*lambda, ask.tokens.len()));
            chunks.push(Chunk {
                tokens: &ask.tokens,
                cache: &ask.kv,
                keep: true,
            });
        }
        self.model
            .set_rtd_lambdas(lambdas.iter().any(Option::is_some).then_some(lambdas));
        let step = self.model.forward_chunks(&chunks);
        self.model.set_rtd_lambdas(None);
        let step = step?;
        let short = || Error::Internal("a step returned fewer rows than it ran".into());
        let mut rows = step.logits.to_vec2::<f32>()?.into_iter();
        let mut deferral = match &step.deferral {
            Some(z) => z.to_vec2::<f32>()?.into_iter().map(Some).collect(),
            None => vec![None; decodes.len()],
        }
        .into_iter();
        let mut caches = step.caches.into_iter();
        for d in decodes.iter_mut() {
            let (Some(row), Some(z), Some(kv)) = (rows.next(), deferral.next(), caches.next()) else {
                return Err(short());
            };
            d.advance(row, kv, z);
        }
        let plan_rows: usize = plans.iter().map(|(p, _)| p.rows()).sum();
        let plan_rows: Vec<Vec<f32>> = rows.by_ref().take(plan_rows).collect();
        let mut caches = caches.skip(plan_chunks);
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let mut answers = Vec::with_capacity(asks.len());
        for (ask, _) in asks {
            let n = ask.tokens.len();
            let mine: Vec<Vec<f32>> = rows.by_ref().take(n).collect();
            let (Some(last), Some(kv)) = (mine.last(), caches.next()) else {
                return Err(short());
            };
            let logits = if ask.all {
                let vocab = last.len();
                Tensor::from_vec(mine.concat(), (n, vocab), self.model.device())?
            } else {
                Tensor::new(last.as_slice(), self.model.device())?
            };
            answers.push(Answer { logits, kv, ms });
        }
        Ok((plan_rows, answers, ms))
    }

    /// Runs walks' asks: together in one [`Engine::chunk_pass`] (the scheduler groups them within
    /// [`BATCH_INVARIANT_ROWS`] rows), or, for a single ask longer than that (a new context's
    /// prefill), alone through [`Transformer::forward`](crate::model::Transformer::forward).
    pub(super) fn run_asks(&mut self, asks: &[(&Ask, Option<f64>)]) -> Result<Vec<Answer>> {
        if let [(ask, lambda)] = asks
            && ask.tokens.len() > BATCH_INVARIANT_ROWS
        {
            let t0 = std::time::Instant::now();
            self.model.set_rtd_lambdas(lambda.map(|l| vec![Some(l)]));
            let input = Tensor::new(ask.tokens.as_slice(), self.model.device())?.unsqueeze(0);
            let out = input.and_then(|i| self.model.forward(&i, &ask.kv, ask.all));
            self.model.set_rtd_lambdas(None);
            let (logits, kv) = out?;
            return Ok(vec![Answer {
                logits: logits.squeeze(0)?,
                kv,
                ms: t0.elapsed().as_secs_f64() * 1e3,
            }]);
        }
        Ok(self.chunk_pass(&mut [], &[], &[], asks)?.1)
    }

    /// The canonical tokens of the context with `cand` appended to the answer.
    fn with_candidate(&self, s: &Session, cand: &str) -> Result<Vec<u32>> {
        with_candidate(&self.codec, &self.limits, s, cand)
    }

    /// A candidate whose tokens change the context's own tokenization: log P(tail + candidate) minus
    /// log P(tail of the context), both from the longest common prefix.
    fn score_alone(
        &self,
        s: &mut Session,
        prefix: &[u32],
        full: &[u32],
        heal_lp: f64,
        usage: &mut Usage,
    ) -> Result<CandidateScore> {
        let common = prefix.iter().zip(full).take_while(|(a, b)| a == b).count().max(1);
        let mut seq_lp = |tokens: &[u32]| -> Result<f64> {
            if tokens.len() <= common {
                return Ok(0.0);
            }
            let (first, kv) = s.cache.logits_after(&self.model, &tokens[..common], usage)?;
            let first = candle_nn::ops::log_softmax(&first, D::Minus1)?.to_vec1::<f32>()?;
            let mut sum = f64::from(first[tokens[common] as usize]);
            let rest = &tokens[common..];
            if rest.len() > 1 {
                let input = Tensor::new(&rest[..rest.len() - 1], self.model.device())?.unsqueeze(0)?;
                let t0 = std::time::Instant::now();
                let (logits, _) = self.model.forward(&input, &kv, true)?;
                usage.forward_ms += t0.elapsed().as_secs_f64() * 1e3;
                usage.forward_passes += 1;
                usage.computed_positions += rest.len() - 1;
                let lp = candle_nn::ops::log_softmax(&logits.squeeze(0)?, D::Minus1)?.to_vec2::<f32>()?;
                for (k, row) in lp.iter().enumerate() {
                    sum += f64::from(row[rest[k + 1] as usize]);
                }
            }
            Ok(sum)
        };
        let with = seq_lp(full)?;
        let without = seq_lp(prefix)?;
        Ok(CandidateScore {
            sum_logprob: with - without - heal_lp,
            token_count: full.len().saturating_sub(common),
            char_count: 0,
        })
    }
}

/// log Σ exp over `ids` (all entries when `None`).
pub(super) fn log_sum_exp(row: &[f32], ids: Option<&[u32]>) -> f32 {
    let vals: Box<dyn Iterator<Item = f32>> = match ids {
        Some(ids) => Box::new(ids.iter().filter_map(|&i| row.get(i as usize).copied())),
        None => Box::new(row.iter().copied()),
    };
    let vals: Vec<f32> = vals.collect();
    let max = vals.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    max + vals.iter().map(|v| (v - max).exp()).sum::<f32>().ln()
}

/// The canonical tokens of the context with `cand` appended to the answer; past the context limit
/// the client's to shorten.
pub(super) fn with_candidate(
    codec: &TextCodec,
    limits: &EngineLimits,
    s: &Session,
    cand: &str,
) -> Result<Vec<u32>> {
    let mut answer = s.answer.clone();
    answer.push_str(cand);
    let full = codec.encode(&s.prompt, &answer)?;
    if full.len() > limits.max_context {
        return Err(Error::ContextTooLong {
            tokens: s.tokens.len(),
            new_tokens: full.len().saturating_sub(s.tokens.len()),
            limit: limits.max_context,
        });
    }
    Ok(full)
}

/// Bytes of context text that string-prefix scoring re-explores the tokenizations of.
pub(super) const PREFIX_BACKOFF_BYTES: usize = 8;

/// The log-probability given to a candidate no token path spells (or pruned away): finite, so that
/// softmaxes over candidates stay defined.
pub const MIN_LOGPROB: f64 = -1e4;
