//! Sessions: append-only contexts with their KV caches, kept under a count and a byte budget with LRU
//! eviction.
//!
//! A session's [`PrefixCache`] holds a few token sequences with their KV caches; any forward pass
//! starts from the entry sharing the longest token prefix with what it needs, so a context that grew
//! by k tokens costs exactly k positions, and hypotheses that share a prefix share its cache.

use std::collections::HashMap;

use candle_core::Tensor;

use super::text::RenderedPrompt;
use crate::chars::{CharOptions, CharState};
use crate::error::Result;
use crate::model::{KvCache, Transformer};

/// Work counted during one call.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// Context tokens.
    pub context_tokens: usize,
    /// Positions served from a cache.
    pub reused_positions: usize,
    /// Positions run through the model (padding excluded).
    pub computed_positions: usize,
    /// Forward passes (a batch counts once).
    pub forward_passes: usize,
    /// Milliseconds queued before the engine took the call.
    pub queue_ms: f64,
    /// Milliseconds of engine work.
    pub compute_ms: f64,
    /// Milliseconds of that in the model's forward passes.
    pub forward_ms: f64,
}

struct Entry {
    tokens: Vec<u32>,
    kv: KvCache,
    /// Logits after the last token, when known.
    logits: Option<Tensor>,
    last_used: u64,
}

/// What [`PrefixCache::lookup_after`] found.
pub enum After {
    /// The logits after the sequence and its cache, held.
    Known(Tensor, KvCache),
    /// A pass must run the positions from `start` after `kv`.
    Compute {
        /// First position to compute.
        start: usize,
        /// The cache of the positions before it.
        kv: KvCache,
    },
}

/// Token sequences with their KV caches (a handful per session).
#[derive(Default)]
pub struct PrefixCache {
    entries: Vec<Entry>,
    clock: u64,
}

const MAX_ENTRIES: usize = 8;

fn lcp(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    /// Bytes of KV storage held: each storage once, however many entries view it, capacity
    /// included.
    pub fn bytes(&self) -> usize {
        let mut seen = std::collections::HashSet::new();
        self.entries
            .iter()
            .filter(|e| seen.insert(e.kv.storage_id()))
            .map(|e| e.kv.bytes())
            .sum()
    }

    /// Longest cached prefix of `tokens`, with its KV cache truncated to it.
    pub fn longest_prefix(&mut self, tokens: &[u32]) -> Result<(usize, KvCache)> {
        self.clock += 1;
        let clock = self.clock;
        let best = self
            .entries
            .iter_mut()
            .map(|e| (lcp(&e.tokens, tokens).min(e.kv.len()), e))
            .max_by_key(|(n, _)| *n);
        match best {
            Some((n, e)) if n > 0 => {
                e.last_used = clock;
                Ok((n, e.kv.truncate(n)?))
            }
            _ => Ok((0, KvCache::default())),
        }
    }

    /// Logits (f32, shape `(vocab,)`) after `tokens` and the KV cache covering them, computing only the
    /// positions no entry holds (at least one unless the exact sequence and its logits are cached).
    pub fn logits_after(
        &mut self,
        model: &Transformer,
        tokens: &[u32],
        usage: &mut Usage,
    ) -> Result<(Tensor, KvCache)> {
        match self.lookup_after(tokens, usage)? {
            After::Known(logits, kv) => Ok((logits, kv)),
            After::Compute { start, kv } => {
                let t0 = std::time::Instant::now();
                let input = Tensor::new(&tokens[start..], model.device())?.unsqueeze(0)?;
                let (logits, kv) = model.forward(&input, &kv, false)?;
                let logits = logits.squeeze(0)?;
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                Ok(self.store_after(tokens, start, logits, kv, ms, usage))
            }
        }
    }

    /// The first half of [`PrefixCache::logits_after`]: the logits and cache when this exact sequence
    /// is held with its logits, else where its computation starts (at least the last position) and
    /// the cache it starts from.
    pub fn lookup_after(&mut self, tokens: &[u32], usage: &mut Usage) -> Result<After> {
        self.clock += 1;
        let clock = self.clock;
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| e.tokens == tokens && e.logits.is_some())
        {
            e.last_used = clock;
            usage.reused_positions += tokens.len();
            if let Some(l) = &e.logits {
                return Ok(After::Known(l.clone(), e.kv.clone()));
            }
        }
        let (cached, kv) = self.longest_prefix(tokens)?;
        let start = cached.min(tokens.len().saturating_sub(1));
        Ok(After::Compute {
            start,
            kv: kv.truncate(start)?,
        })
    }

    /// The second half: remembers the pass's result (`logits` after `tokens`, `kv` covering them,
    /// computed from `start` in `ms`), counts it, and returns it.
    pub fn store_after(
        &mut self,
        tokens: &[u32],
        start: usize,
        logits: Tensor,
        kv: KvCache,
        ms: f64,
        usage: &mut Usage,
    ) -> (Tensor, KvCache) {
        usage.forward_ms += ms;
        usage.reused_positions += start;
        usage.computed_positions += tokens.len() - start;
        usage.forward_passes += 1;
        self.insert(tokens.to_vec(), kv.clone(), Some(logits.clone()));
        (logits, kv)
    }

    /// Remembers `tokens` with their cache; an entry that is a prefix of `tokens` is replaced.
    pub fn insert(&mut self, tokens: Vec<u32>, kv: KvCache, logits: Option<Tensor>) {
        self.clock += 1;
        let last_used = self.clock;
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| tokens.starts_with(&e.tokens) || e.tokens == tokens)
        {
            *e = Entry {
                tokens,
                kv,
                logits,
                last_used,
            };
            return;
        }
        if self.entries.len() >= MAX_ENTRIES
            && let Some(i) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
        {
            self.entries.swap_remove(i);
        }
        self.entries.push(Entry {
            tokens,
            kv,
            logits,
            last_used,
        });
    }
}

/// The next-character state of a session and the options it was built with.
pub struct CharSlot {
    /// The hypothesis set.
    pub state: CharState,
    /// Options it was built with.
    pub opts: CharOptions,
    /// The states along the text of the last `NextCharDistributions` call: after each of its first
    /// characters (byte end, state after committing up to there and answering there). The next call
    /// resumes from the longest of them that the answer's new text starts with.
    pub ahead: Vec<(usize, CharState)>,
    /// That text.
    pub ahead_text: String,
}

/// One context kept between calls.
pub struct Session {
    /// Session id ("" for a one-off context).
    pub id: String,
    /// The rendered prompt.
    pub prompt: RenderedPrompt,
    /// The answer so far.
    pub answer: String,
    /// Characters in `answer`.
    pub answer_chars: usize,
    /// Canonical tokens of prompt + answer.
    pub tokens: Vec<u32>,
    /// KV caches.
    pub cache: PrefixCache,
    /// Next-character state, if NextCharDistribution was called.
    pub chars: Option<CharSlot>,
    /// Answer text appended since `chars` last saw it.
    pub chars_pending: String,
    last_used: u64,
}

impl Session {
    /// A new session with no cache.
    pub fn new(id: String, prompt: RenderedPrompt) -> Self {
        Self {
            id,
            prompt,
            answer: String::new(),
            answer_chars: 0,
            tokens: vec![],
            cache: PrefixCache::default(),
            chars: None,
            chars_pending: String::new(),
            last_used: 0,
        }
    }

    /// Bytes held (KV caches).
    pub fn bytes(&self) -> usize {
        self.cache.bytes()
    }
}

/// All sessions of the node, bounded by count and bytes.
pub struct Sessions {
    map: HashMap<String, Session>,
    clock: u64,
    max_sessions: usize,
    budget_bytes: usize,
    evictions: u64,
}

impl Sessions {
    /// An empty set with the given limits.
    pub fn new(max_sessions: usize, budget_bytes: usize) -> Self {
        Self {
            map: HashMap::new(),
            clock: 0,
            max_sessions: max_sessions.max(1),
            budget_bytes,
            evictions: 0,
        }
    }

    /// Takes a session out for a call (put it back with [`Sessions::put`]).
    pub fn take(&mut self, id: &str) -> Option<Session> {
        self.map.remove(id)
    }

    /// Returns a session after a call and evicts least-recently-used sessions over the limits.
    /// The returned session is evicted last; a single session over the byte budget is kept.
    pub fn put(&mut self, mut s: Session) {
        if s.id.is_empty() {
            return;
        }
        self.clock += 1;
        s.last_used = self.clock;
        self.map.insert(s.id.clone(), s);
        while self.map.len() > self.max_sessions || (self.bytes() > self.budget_bytes && self.map.len() > 1) {
            let Some(victim) = self
                .map
                .values()
                .min_by_key(|s| s.last_used)
                .map(|s| s.id.clone())
            else {
                break;
            };
            self.map.remove(&victim);
            self.evictions += 1;
        }
    }

    /// Drops a session; whether it existed.
    pub fn close(&mut self, id: &str) -> bool {
        self.map.remove(id).is_some()
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no session is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes held by all sessions.
    pub fn bytes(&self) -> usize {
        self.map.values().map(Session::bytes).sum()
    }

    /// Sessions evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }
}
