//! The next-character questions on a session: the distribution after the answer
//! (`NextCharDistribution`) and the distributions at every position of a continuation, with an
//! optional greedy draft of the node's own (`NextCharDistributions`, speculative CharED).
//!
//! Both keep the session's hypothesis set ([`CharSlot`]) and continue it when the answer only grew:
//! new text is committed one character at a time, so a position reached by a continuation call gets
//! exactly the hypotheses the same characters appended one by one would give. A continuation call
//! leaves the set at position 0 and remembers the states along its text, so the next call resumes
//! from the longest accepted prefix without recomputing it.

use super::NextCharsParams;
use std::sync::Arc;

use super::session::{CharSlot, Session, Usage};
use super::text::Heal;
use super::walk::{CachedModel, Memo, Walker};
use crate::chars::{CharDistribution, CharOptions, CharState};
use crate::error::{Error, Result};

/// Distributions along a continuation.
#[derive(Debug, Clone)]
pub struct CharRun {
    /// Positions 0..=n of continuation + drafted.
    pub positions: Vec<CharDistribution>,
    /// The node's own greedy draft after the continuation.
    pub drafted: String,
    /// Hypotheses alive at position 0.
    pub hypotheses: usize,
    /// With [`NextCharsParams::observed`]: the exact probability of the continuation's character at
    /// each of its positions (one per continuation character).
    pub observed: Vec<f64>,
    /// Work done.
    pub usage: Usage,
}

/// A next-character distribution.
#[derive(Debug, Clone)]
pub struct CharsOut {
    /// The distribution.
    pub dist: CharDistribution,
    /// Hypotheses alive.
    pub hypotheses: usize,
    /// Work done.
    pub usage: Usage,
}

fn char_opts_eq(a: &CharOptions, b: &CharOptions) -> bool {
    a.max_hypotheses == b.max_hypotheses && a.min_mass == b.min_mass && a.lookahead == b.lookahead
}

/// The greedy choice of a node drafting by its own distribution: the most likely character, or
/// `None` where end-of-answer is at least as likely (or nothing is listed).
fn greedy(d: &CharDistribution) -> Option<char> {
    let (c, p) = d.chars.iter().copied().max_by(|a, b| a.1.total_cmp(&b.1))?;
    (p > d.eos).then_some(c)
}

impl Walker {
    /// A fresh hypothesis set for the context's prompt with `answer` as the answer: the canonical
    /// tokens with the last one backed off (or, for published CharED, as they are).
    async fn fresh_chars(
        &self,
        s: &mut Session,
        answer: &str,
        opts: &CharOptions,
        usage: &mut Usage,
    ) -> Result<CharState> {
        let tokens = if answer.len() == s.answer.len() {
            s.tokens.clone()
        } else {
            let t = self.codec.encode(&s.prompt, answer)?;
            if t.len() >= self.limits.max_context {
                return Err(Error::ContextTooLong {
                    tokens: s.tokens.len(),
                    new_tokens: t.len().saturating_sub(s.tokens.len()),
                    limit: self.limits.max_context,
                });
            }
            t
        };
        let text_empty = s.prompt.text.is_empty() && answer.is_empty();
        let mut heal = self.codec.heal(&tokens, text_empty);
        if !opts.lookahead && !text_empty {
            // Published CharED: the canonical tokenization as is, no back-off.
            heal = Heal {
                prefix_len: tokens.len(),
                remainder: vec![],
            };
        }
        let mut m = CachedModel {
            asker: &self.asker,
            cache: &mut s.cache,
            usage,
            memo: None,
        };
        CharState::new(
            tokens[..heal.prefix_len].to_vec(),
            heal.remainder,
            opts.clone(),
            &self.codec.vocab,
            &mut m,
        )
        .await
    }

    /// The session's hypothesis set brought up to its answer: the kept set continued through the
    /// new text one character at a time (from the longest remembered state the text starts with),
    /// or a fresh one when there is none, the options changed, or the set could not follow.
    async fn char_slot(&self, s: &mut Session, opts: &CharOptions, usage: &mut Usage) -> Result<CharSlot> {
        let pending = std::mem::take(&mut s.chars_pending);
        let reuse = opts.lookahead && s.chars.as_ref().is_some_and(|c| char_opts_eq(&c.opts, opts));
        let mut slot = if reuse { s.chars.take() } else { None };
        if let Some(c) = slot.as_mut() {
            let mut rest = pending.as_str();
            let ahead = std::mem::take(&mut c.ahead);
            if let Some((end, state)) = ahead
                .into_iter()
                .rev()
                .find(|(end, _)| pending.starts_with(&c.ahead_text[..*end]))
            {
                c.state = state;
                rest = &pending[end..];
            }
            c.ahead_text.clear();
            let mut m = CachedModel {
                asker: &self.asker,
                cache: &mut s.cache,
                usage,
                memo: None,
            };
            let mut buf = [0u8; 4];
            for ch in rest.chars() {
                c.state
                    .commit(ch.encode_utf8(&mut buf), &self.codec.vocab, &mut m)
                    .await?;
                if c.state.hypotheses() == 0 {
                    break;
                }
            }
            if c.state.hypotheses() == 0 {
                slot = None; // committed text the hypotheses could not follow: rebuild canonically
            }
        }
        Ok(match slot {
            Some(c) => c,
            None => {
                let answer = s.answer.clone();
                CharSlot {
                    state: self.fresh_chars(s, &answer, opts, usage).await?,
                    opts: opts.clone(),
                    ahead: vec![],
                    ahead_text: String::new(),
                }
            }
        })
    }

    /// The next-character distribution, continuing the session's hypothesis set when the context only
    /// grew since the last call (no forward pass unless a hypothesis crosses a token boundary).
    pub(super) async fn next_char(
        &self,
        s: &mut Session,
        top_k: usize,
        opts: &CharOptions,
        usage: &mut Usage,
    ) -> Result<CharsOut> {
        let mut slot = self.char_slot(s, opts, usage).await?;
        let mut m = CachedModel {
            asker: &self.asker,
            cache: &mut s.cache,
            usage,
            memo: None,
        };
        let dist = slot.state.distribution(top_k, &self.codec.vocab, &mut m).await?;
        let hypotheses = slot.state.hypotheses();
        s.chars = Some(slot);
        Ok(CharsOut {
            dist,
            hypotheses,
            usage: Usage::default(),
        })
    }

    /// The distributions at positions 0..=n of `continuation` followed by up to `draft_chars` of the
    /// node's own greedy characters. Position j's is what [`Engine::next_char`] would answer after
    /// the first j characters were appended one call at a time: the same commits in the same order
    /// (and, where the set cannot follow or for published CharED, the same fresh rebuild).
    pub(super) async fn next_chars(
        &self,
        s: &mut Session,
        p: &NextCharsParams,
        usage: &mut Usage,
    ) -> Result<CharRun> {
        let (continuation, draft_chars, top_k, opts) =
            (p.continuation.as_str(), p.draft_chars, p.top_k, &p.opts);
        let mut observed = Vec::new();
        let mut memo = Memo::new();
        if !continuation.is_empty() {
            let mut answer = s.answer.clone();
            answer.push_str(continuation);
            let tokens = self.codec.encode(&s.prompt, &answer)?;
            if tokens.len() >= self.limits.max_context {
                return Err(Error::ContextTooLong {
                    tokens: s.tokens.len(),
                    new_tokens: tokens.len().saturating_sub(s.tokens.len()),
                    limit: self.limits.max_context,
                });
            }
            if opts.lookahead {
                memo = self.path_probs(s, &tokens, usage).await?;
            }
        }
        let memo = (!memo.is_empty()).then_some(&memo);
        let mut slot = self.char_slot(s, opts, usage).await?;
        let vocab = &self.codec.vocab;
        let first = {
            let mut m = CachedModel {
                asker: &self.asker,
                cache: &mut s.cache,
                usage,
                memo,
            };
            slot.state.distribution(top_k, vocab, &mut m).await?
        };
        let hypotheses = slot.state.hypotheses();
        let mut positions = vec![first];
        let mut text = String::with_capacity(continuation.len() + draft_chars * 2);
        let mut drafted = String::new();
        let mut ahead: Vec<(usize, CharState)> = Vec::new();
        let mut state = slot.state.clone();
        let mut conts = continuation.chars();
        // Positions a draft may still add: each character is at most 4 tokens of the context.
        let room = self.limits.max_context.saturating_sub(s.tokens.len() + 1) / 4;
        let mut buf = [0u8; 4];
        loop {
            let ch = match conts.next() {
                Some(ch) => {
                    if p.observed {
                        let mut m = CachedModel {
                            asker: &self.asker,
                            cache: &mut s.cache,
                            usage,
                            memo,
                        };
                        observed.push(state.char_prob(ch, vocab, &mut m).await?);
                    }
                    ch
                }
                None if drafted.chars().count() < draft_chars.min(room) => {
                    match positions.last().and_then(greedy) {
                        Some(ch) => {
                            drafted.push(ch);
                            ch
                        }
                        None => break,
                    }
                }
                None => break,
            };
            text.push(ch);
            let mut m = CachedModel {
                asker: &self.asker,
                cache: &mut s.cache,
                usage,
                memo,
            };
            if opts.lookahead {
                state.commit(ch.encode_utf8(&mut buf), vocab, &mut m).await?;
            }
            if !opts.lookahead || state.hypotheses() == 0 {
                let mut so_far = s.answer.clone();
                so_far.push_str(&text);
                state = self.fresh_chars(s, &so_far, opts, usage).await?;
            }
            let mut m = CachedModel {
                asker: &self.asker,
                cache: &mut s.cache,
                usage,
                memo,
            };
            positions.push(state.distribution(top_k, vocab, &mut m).await?);
            if opts.lookahead {
                ahead.push((text.len(), state.clone()));
            }
        }
        slot.ahead = ahead;
        slot.ahead_text = text;
        s.chars = Some(slot);
        Ok(CharRun {
            positions,
            drafted,
            hypotheses,
            observed,
            usage: Usage::default(),
        })
    }

    /// One forward pass over the positions of `tokens` (the canonical path of the context and a
    /// continuation) that no cache entry holds, keeping the next-token probabilities after each of
    /// them: the hypotheses that follow the canonical path find theirs here instead of running a
    /// pass each. At most [`MEMO_POSITIONS`] positions (the memo holds one vocabulary row each).
    async fn path_probs(&self, s: &mut Session, tokens: &[u32], usage: &mut Usage) -> Result<Memo> {
        let mut memo = Memo::new();
        let (cached, kv) = s.cache.longest_prefix(tokens)?;
        let start = cached.min(tokens.len().saturating_sub(1));
        let end = tokens.len().min(start + MEMO_POSITIONS);
        if start == 0 || end <= start + 1 {
            return Ok(memo); // nothing cached to start from, or a single position: no gain
        }
        let kv = kv.truncate(start)?;
        let a = self.asker.forward(&tokens[start..end], &kv, true).await?;
        let probs = candle_nn::ops::softmax_last_dim(&a.logits)?.to_vec2::<f32>()?;
        usage.forward_ms += a.ms;
        usage.forward_passes += 1;
        usage.reused_positions += start;
        usage.computed_positions += end - start;
        for (i, row) in probs.into_iter().enumerate() {
            memo.insert(tokens[..start + i + 1].to_vec(), Arc::from(row));
        }
        let last = a.logits.get(end - start - 1)?;
        s.cache.insert(tokens[..end].to_vec(), a.kv, Some(last));
        Ok(memo)
    }
}

/// Most positions of a continuation's canonical path computed in one pass.
const MEMO_POSITIONS: usize = 64;
