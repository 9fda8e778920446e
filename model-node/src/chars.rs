//! The next-character distribution of a language model given text: the node side of CharED, computed
//! exactly over token paths (Vieira et al.) with pruning.
//!
//! A *hypothesis* is a token path `T` from the start prefix whose bytes cover part of the committed
//! text, the committed bytes `rem` it leaves uncovered (the next token must spell them first), and its
//! weight (the product of its token probabilities). The set of hypotheses holds every path that spells
//! the committed text, pruned to the `max_hypotheses` heaviest and to a share `min_mass` of the total.
//!
//! For the next character `c` (bytes `β`), with `p = p(· | T_h)`:
//! `P(c) ∝ Σ_h w_h · Σ_{t: bytes(t) starts with rem_h·β} p(t)` plus the *look-ahead* terms of tokens that
//! end inside `c` (`bytes(t) = rem_h·β'`, `β'` an incomplete prefix of `c`), which need the model after
//! `T_h + t` (a forward pass). EOS comes from hypotheses with nothing left to cover. The distribution is
//! normalised over `{EOS} ∪ characters`; token paths whose bytes stop being UTF-8 are not outcomes.
//!
//! Costs: per forward pass, one O(V) prefix sum of the probabilities in byte-trie order
//! ([`Vocab::trie_cumsum`]); afterwards the mass of any byte prefix is one subtraction, and the top-k
//! characters come from a best-first walk of the byte trie (a prefix's mass bounds every character
//! under it). Committing a character calls the model only when a path crosses a token boundary.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use crate::vocab::Vocab;

/// The model as the character walk needs it. The call is `async` so that a walk can wait for its
/// forward pass while the node's engine gathers other work into the same batched pass (the engine
/// polls its walks itself, on its own thread); a model that answers at once makes every walk a plain
/// function, driven by [`now`].
#[allow(async_fn_in_trait)] // the walks are polled on one thread: no `Send` bound is wanted
pub trait NextTokenModel {
    /// The error of a model call.
    type Error;
    /// Next-token probabilities (length: the model's vocabulary rows) after the token sequence `tokens`.
    async fn next_probs(&mut self, tokens: &[u32]) -> Result<Arc<[f32]>, Self::Error>;
}

/// The result of a walk over a model that never waits (one whose `next_probs` does not await
/// anything else): its future is ready at the first poll.
///
/// # Panics
/// If the future is not ready at once: a model that waits needs an executor (the engine's).
pub fn now<F: std::future::Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => out,
        std::task::Poll::Pending => panic!("chars::now: the model waited; drive this walk on an executor"),
    }
}

/// Pruning and method options.
#[derive(Debug, Clone, PartialEq)]
pub struct CharOptions {
    /// Hypotheses kept (K).
    pub max_hypotheses: usize,
    /// Hypotheses and look-ahead paths below this share of the total mass are dropped (ε).
    pub min_mass: f64,
    /// Follow token paths across boundaries (the exact method). `false` with `max_hypotheses = 1` is
    /// the published CharED: the canonical tokenization only.
    pub lookahead: bool,
}

impl Default for CharOptions {
    fn default() -> Self {
        Self {
            max_hypotheses: 4,
            min_mass: 1e-4,
            lookahead: true,
        }
    }
}

/// A next-character distribution: `chars` (most likely first) + `eos` + `residual` = 1.
#[derive(Debug, Clone, PartialEq)]
pub struct CharDistribution {
    /// The top characters and their probabilities.
    pub chars: Vec<(char, f64)>,
    /// Probability that the text ends here.
    pub eos: f64,
    /// Mass of the characters not listed.
    pub residual: f64,
}

/// Next-token probabilities after one token path, with their trie-order prefix sums.
#[derive(Clone)]
struct Dist {
    probs: Arc<[f32]>,
    cum: Arc<Vec<f64>>,
    eos: f64,
    /// What the empty remainder needs, computed at most once per forward pass.
    root: Arc<std::sync::OnceLock<RootScan>>,
}

/// For an empty remainder: the mass of tokens that do not start with a whole character, and those that
/// start an unfinished one (candidates for look-ahead), most probable first.
struct RootScan {
    bad: f64,
    incomplete: Vec<(u32, f64)>,
}

impl Dist {
    fn p(&self, id: u32) -> f64 {
        f64::from(self.probs.get(id as usize).copied().unwrap_or(0.0))
    }

    /// Mass of the tokens whose bytes start with `prefix` (all text tokens for an empty prefix).
    /// Small ranges are summed directly: a difference of prefix sums loses ~1e-16 absolutely, which is
    /// everything when the range's mass is itself tiny (text the model finds very unlikely).
    fn mass(&self, v: &Vocab, prefix: &[u8]) -> f64 {
        self.range_mass(v, v.prefix_range(prefix))
    }

    /// Mass of the tokens at trie positions `r`.
    fn range_mass(&self, v: &Vocab, r: std::ops::Range<usize>) -> f64 {
        if r.len() <= DIRECT_SUM {
            return r.map(|pos| self.p(v.sorted_id(pos))).sum();
        }
        self.cum.get(r.end).copied().unwrap_or(0.0) - self.cum.get(r.start).copied().unwrap_or(0.0)
    }

    fn root_scan(&self, v: &Vocab) -> &RootScan {
        self.root.get_or_init(|| {
            let mut bad = 0.0;
            let mut incomplete = Vec::new();
            for &pos in v.irregular_in(0..v.n_text()) {
                let id = v.sorted_id(pos);
                match classify(v.sorted_bytes(pos)) {
                    Start::Complete(_) => {}
                    Start::Incomplete => {
                        bad += self.p(id);
                        incomplete.push((id, self.p(id)));
                    }
                    Start::Invalid => bad += self.p(id),
                }
            }
            incomplete.sort_by(|a, b| b.1.total_cmp(&a.1));
            RootScan { bad, incomplete }
        })
    }

    /// Mass of the tokens strictly longer than `prefix` that start with it: the prefix's trie range
    /// without its leading exact matches, summed on its own (subtracting a dominant exact token from
    /// the whole range's mass would cancel away the digits of a small remainder).
    fn mass_beyond(&self, v: &Vocab, prefix: &[u8]) -> f64 {
        let r = v.prefix_range(prefix);
        if prefix.is_empty() {
            return self.range_mass(v, r);
        }
        let exact = r
            .clone()
            .take_while(|&pos| v.sorted_bytes(pos).len() == prefix.len())
            .count();
        self.range_mass(v, r.start + exact..r.end)
    }
}

/// Token ids whose bytes are exactly `bytes`.
fn exact<'a>(v: &'a Vocab, bytes: &'a [u8]) -> impl Iterator<Item = u32> + 'a {
    let r = v.prefix_range(bytes);
    r.take_while(move |&pos| v.sorted_bytes(pos).len() == bytes.len())
        .map(move |pos| v.sorted_id(pos))
}

/// Distinct next bytes after `prefix` among the tokens in the trie (excluding tokens equal to it).
fn child_bytes(v: &Vocab, prefix: &[u8], out: &mut Vec<u8>) {
    let r = v.prefix_range(prefix);
    let mut pos = r.start;
    let mut key = prefix.to_vec();
    while pos < r.end {
        let b = v.sorted_bytes(pos);
        if b.len() == prefix.len() {
            pos += 1;
            continue;
        }
        let x = b[prefix.len()];
        out.push(x);
        key.truncate(prefix.len());
        key.push(x);
        pos = v.prefix_range(&key).end.max(pos + 1);
    }
}

/// How the bytes at the start of a stream begin a character.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// A whole character of this many bytes.
    Complete(usize),
    /// A valid but unfinished character.
    Incomplete,
    /// Not UTF-8.
    Invalid,
}

fn utf8_len(lead: u8) -> Option<usize> {
    match lead {
        0x00..=0x7F => Some(1),
        0xC2..=0xDF => Some(2),
        0xE0..=0xEF => Some(3),
        0xF0..=0xF4 => Some(4),
        _ => None,
    }
}

fn classify(s: &[u8]) -> Start {
    let Some(&lead) = s.first() else {
        return Start::Incomplete;
    };
    let Some(need) = utf8_len(lead) else {
        return Start::Invalid;
    };
    if s.len() >= need {
        return if std::str::from_utf8(&s[..need]).is_ok() {
            Start::Complete(need)
        } else {
            Start::Invalid
        };
    }
    let second_ok = |b: u8| match lead {
        0xE0 => (0xA0..=0xBF).contains(&b),
        0xED => (0x80..=0x9F).contains(&b),
        0xF0 => (0x90..=0xBF).contains(&b),
        0xF4 => (0x80..=0x8F).contains(&b),
        _ => (0x80..=0xBF).contains(&b),
    };
    let ok = s.iter().enumerate().skip(1).all(|(i, &b)| {
        if i == 1 {
            second_ok(b)
        } else {
            (0x80..=0xBF).contains(&b)
        }
    });
    if ok { Start::Incomplete } else { Start::Invalid }
}

#[derive(Clone)]
struct Hyp {
    tokens: Vec<u32>,
    rem: Vec<u8>,
    w: f64,
    dist: Dist,
}

/// A path whose last token ended inside the next character: `pend` are that character's first bytes.
#[derive(Clone)]
struct Look {
    tokens: Vec<u32>,
    pend: Vec<u8>,
    w: f64,
    dist: Dist,
}

/// What `distribution` derives from the hypotheses (kept until the next commit).
#[derive(Clone)]
struct Analysis {
    looks: Vec<Look>,
    z: f64,
    eos: f64,
}

/// The hypothesis set of one context.
#[derive(Clone)]
pub struct CharState {
    hyps: Vec<Hyp>,
    opts: CharOptions,
    calls: u64,
    analysis: Option<Analysis>,
}

/// Ranges up to this many tokens are summed directly instead of from prefix sums.
const DIRECT_SUM: usize = 256;

/// Most look-ahead paths followed per step when pruning (each costs a forward pass).
const MAX_LOOKS: usize = 64;

#[derive(PartialEq)]
struct Node(f64, Vec<u8>);

impl Eq for Node {}

impl PartialOrd for Node {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Node {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0).then_with(|| other.1.cmp(&self.1))
    }
}

impl CharState {
    /// The hypotheses for a context whose canonical tokens with the last one backed off are `prefix`
    /// and whose remaining bytes are `remainder`.
    pub async fn new<M: NextTokenModel>(
        prefix: Vec<u32>,
        remainder: Vec<u8>,
        opts: CharOptions,
        vocab: &Vocab,
        model: &mut M,
    ) -> Result<Self, M::Error> {
        let mut s = Self {
            hyps: vec![],
            opts,
            calls: 0,
            analysis: None,
        };
        let dist = s.dist(&prefix, vocab, model, &HashMap::new()).await?;
        s.hyps.push(Hyp {
            tokens: prefix,
            rem: vec![],
            w: 1.0,
            dist,
        });
        if !remainder.is_empty() {
            s.commit_bytes(&remainder, vocab, model).await?;
        }
        Ok(s)
    }

    /// Hypotheses alive (0: the committed text is impossible or was pruned away; rebuild).
    pub fn hypotheses(&self) -> usize {
        self.hyps.len()
    }

    /// Model calls made so far (each is at most one forward pass).
    pub fn model_calls(&self) -> u64 {
        self.calls
    }

    async fn dist<M: NextTokenModel>(
        &mut self,
        tokens: &[u32],
        vocab: &Vocab,
        model: &mut M,
        known: &HashMap<Vec<u32>, Dist>,
    ) -> Result<Dist, M::Error> {
        if let Some(d) = known.get(tokens) {
            return Ok(d.clone());
        }
        let probs = model.next_probs(tokens).await?;
        self.calls += 1;
        let eos = vocab
            .eos_ids()
            .iter()
            .map(|&e| f64::from(probs.get(e as usize).copied().unwrap_or(0.0)))
            .sum();
        let cum = Arc::new(vocab.trie_cumsum(&probs));
        Ok(Dist {
            probs,
            cum,
            eos,
            root: Arc::default(),
        })
    }

    fn live(&self, h: &Hyp, vocab: &Vocab) -> f64 {
        h.w * (h.dist.mass_beyond(vocab, &h.rem) + if h.rem.is_empty() { h.dist.eos } else { 0.0 })
    }

    /// The probability that the text after the start token path begins with everything committed so
    /// far (the remainder given to [`CharState::new`] included): the mass of the token paths that
    /// spell it exactly (whatever follows) and of those whose last token runs past its end. Exact
    /// with unbounded hypotheses and `min_mass` 0; pruning makes it a lower bound. The ratio of two
    /// calls is P(text committed in between | text before): a candidate scored as a string prefix,
    /// wherever it ends inside a token.
    pub fn prefix_mass(&self, vocab: &Vocab) -> f64 {
        self.hyps
            .iter()
            .map(|h| {
                if h.rem.is_empty() {
                    h.w
                } else {
                    h.w * h.dist.mass_beyond(vocab, &h.rem)
                }
            })
            .sum()
    }

    /// The probability that the text after the start token path is exactly everything committed so
    /// far and then ends: the mass of the paths that spell it exactly times their EOS probability.
    /// The ratio to [`CharState::prefix_mass`] before the text is P(the rest of the answer is the text).
    pub fn end_mass(&self, _vocab: &Vocab) -> f64 {
        self.hyps
            .iter()
            .filter(|h| h.rem.is_empty())
            .map(|h| h.w * h.dist.eos)
            .sum()
    }

    /// Appends committed text.
    pub async fn commit<M: NextTokenModel>(
        &mut self,
        text: &str,
        vocab: &Vocab,
        model: &mut M,
    ) -> Result<(), M::Error> {
        self.commit_bytes(text.as_bytes(), vocab, model).await
    }

    async fn commit_bytes<M: NextTokenModel>(
        &mut self,
        bytes: &[u8],
        vocab: &Vocab,
        model: &mut M,
    ) -> Result<(), M::Error> {
        // Look-ahead paths of the last step are the children of this one: reuse their distributions.
        let known: HashMap<Vec<u32>, Dist> = self
            .analysis
            .take()
            .map(|a| a.looks.into_iter().map(|l| (l.tokens, l.dist)).collect())
            .unwrap_or_default();
        let mut next: Vec<Hyp> = Vec::new();
        // (tokens, rem, weight) of paths that cross a token boundary inside the committed bytes.
        let mut pending: Vec<(Vec<u32>, Vec<u8>, f64)> = Vec::new();
        for h in std::mem::take(&mut self.hyps) {
            let mut rem = h.rem.clone();
            rem.extend_from_slice(bytes);
            if self.opts.lookahead {
                for k in h.rem.len() + 1..=rem.len() {
                    for id in exact(vocab, &rem[..k]) {
                        let mut tokens = h.tokens.clone();
                        tokens.push(id);
                        pending.push((tokens, rem[k..].to_vec(), h.w * h.dist.p(id)));
                    }
                }
            }
            if h.dist.mass_beyond(vocab, &rem) > 0.0 {
                next.push(Hyp { rem, ..h });
            }
        }
        let mut lives: Vec<f64> = next.iter().map(|h| self.live(h, vocab)).collect();
        while !pending.is_empty() {
            pending.sort_by(|a, b| b.2.total_cmp(&a.2));
            let (tokens, rem, w) = pending.remove(0);
            let total: f64 = lives.iter().sum::<f64>() + w + pending.iter().map(|p| p.2).sum::<f64>();
            let mut sorted = lives.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let kth = sorted
                .get(self.opts.max_hypotheses.saturating_sub(1))
                .copied()
                .unwrap_or(0.0);
            if w <= 0.0
                || w < self.opts.min_mass * total
                || (sorted.len() >= self.opts.max_hypotheses && w < kth)
            {
                continue; // cannot make the cut: no forward pass
            }
            let dist = self.dist(&tokens, vocab, model, &known).await?;
            for k in 1..=rem.len() {
                for id in exact(vocab, &rem[..k]) {
                    let mut t = tokens.clone();
                    t.push(id);
                    pending.push((t, rem[k..].to_vec(), w * dist.p(id)));
                }
            }
            let h = Hyp { tokens, rem, w, dist };
            if h.rem.is_empty() || h.dist.mass_beyond(vocab, &h.rem) > 0.0 {
                lives.push(self.live(&h, vocab));
                next.push(h);
            }
        }
        let total: f64 = lives.iter().sum();
        let mut ranked: Vec<(f64, Hyp)> = lives.into_iter().zip(next).filter(|(l, _)| *l > 0.0).collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        ranked.truncate(self.opts.max_hypotheses.max(1));
        self.hyps = ranked
            .into_iter()
            .filter(|(l, _)| *l >= self.opts.min_mass * total)
            .map(|(_, h)| h)
            .collect();
        Ok(())
    }

    /// Normaliser, EOS mass and look-ahead paths for the current hypotheses.
    async fn analyse<M: NextTokenModel>(
        &mut self,
        vocab: &Vocab,
        model: &mut M,
    ) -> Result<Analysis, M::Error> {
        let mut z = 0.0;
        let mut eos = 0.0;
        // (weight, tokens, pending bytes) of paths whose last token ends inside the next character.
        let mut cands: Vec<(f64, Vec<u32>, Vec<u8>)> = Vec::new();
        for h in &self.hyps {
            let mut incomplete: Vec<(u32, f64, Vec<u8>)> = Vec::new();
            let bad = if h.rem.is_empty() {
                eos += h.w * h.dist.eos;
                let scan = h.dist.root_scan(vocab);
                // Candidates under min_mass x this path's own mass can never be followed: stop there.
                let floor = self.opts.min_mass * (h.dist.mass_beyond(vocab, &h.rem) - scan.bad + h.dist.eos);
                for &(id, p) in scan.incomplete.iter().take_while(|(_, p)| *p >= floor) {
                    incomplete.push((id, p, vocab.token_bytes(id).unwrap_or_default().to_vec()));
                }
                scan.bad
            } else {
                let mut bad = 0.0;
                for &pos in vocab.irregular_in(vocab.prefix_range(&h.rem)) {
                    let b = vocab.sorted_bytes(pos);
                    if b.len() <= h.rem.len() {
                        continue;
                    }
                    let id = vocab.sorted_id(pos);
                    match classify(&b[h.rem.len()..]) {
                        Start::Complete(_) => {}
                        Start::Incomplete => {
                            bad += h.dist.p(id);
                            incomplete.push((id, h.dist.p(id), b[h.rem.len()..].to_vec()));
                        }
                        Start::Invalid => bad += h.dist.p(id),
                    }
                }
                bad
            };
            z += h.w * (h.dist.mass_beyond(vocab, &h.rem) - bad);
            if self.opts.lookahead {
                for (id, p, pend) in incomplete {
                    let mut t = h.tokens.clone();
                    t.push(id);
                    cands.push((h.w * p, t, pend));
                }
            }
        }
        z += eos;
        let block = vocab.first_byte_block(0x80, 0xBF);
        let mut looks = Vec::new();
        let cap = if self.opts.min_mass > 0.0 {
            MAX_LOOKS
        } else {
            usize::MAX
        };
        let mut pending: f64 = cands.iter().map(|c| c.0).sum();
        let mut heap: BinaryHeap<Node> = BinaryHeap::new();
        let mut paths: Vec<(Vec<u32>, Vec<u8>)> = Vec::new();
        for (w, t, pend) in cands {
            heap.push(Node(w, (paths.len() as u64).to_be_bytes().to_vec()));
            paths.push((t, pend));
        }
        let mut buf = Vec::with_capacity(8);
        while looks.len() < cap {
            let Some(Node(w, key)) = heap.pop() else { break };
            pending -= w;
            let idx = key.try_into().map(u64::from_be_bytes).unwrap_or(u64::MAX) as usize;
            let Some((tokens, pend)) = paths.get(idx).cloned() else {
                continue;
            };
            if w <= 0.0 || w < self.opts.min_mass * (z + w + pending) {
                break; // the heap is ordered: every later candidate is lighter
            }
            let dist = self.dist(&tokens, vocab, model, &HashMap::new()).await?;
            let mut valid = 0.0;
            for pos in block.clone() {
                let id = vocab.sorted_id(pos);
                buf.clear();
                buf.extend_from_slice(&pend);
                buf.extend_from_slice(vocab.sorted_bytes(pos));
                match classify(&buf) {
                    Start::Complete(_) => valid += dist.p(id),
                    Start::Incomplete => {
                        let cw = w * dist.p(id);
                        let mut t = tokens.clone();
                        t.push(id);
                        heap.push(Node(cw, (paths.len() as u64).to_be_bytes().to_vec()));
                        paths.push((t, buf.clone()));
                        pending += cw;
                    }
                    Start::Invalid => {}
                }
            }
            z += w * valid;
            looks.push(Look {
                tokens,
                pend,
                w,
                dist,
            });
        }
        Ok(Analysis { looks, z, eos })
    }

    /// Upper bound of the mass of characters starting with `beta` (exact for a whole character).
    fn bound(&self, looks: &[Look], vocab: &Vocab, beta: &[u8]) -> f64 {
        let mut u = 0.0;
        let mut key = Vec::new();
        for h in &self.hyps {
            key.clear();
            key.extend_from_slice(&h.rem);
            key.extend_from_slice(beta);
            u += h.w * h.dist.mass(vocab, &key);
        }
        for l in looks {
            if l.pend.len() < beta.len() && beta.starts_with(&l.pend) {
                u += l.w * l.dist.mass(vocab, &beta[l.pend.len()..]);
            }
        }
        u
    }

    /// The exact probability that the next character is `c` (0 when no hypothesis is alive).
    pub async fn char_prob<M: NextTokenModel>(
        &mut self,
        c: char,
        vocab: &Vocab,
        model: &mut M,
    ) -> Result<f64, M::Error> {
        if self.analysis.is_none() {
            let a = self.analyse(vocab, model).await?;
            self.analysis = Some(a);
        }
        let Some(a) = &self.analysis else {
            return Ok(0.0);
        };
        if a.z <= 0.0 || !a.z.is_finite() {
            return Ok(0.0);
        }
        let mut buf = [0u8; 4];
        // A whole character's bound is its exact mass (the search in `distribution` lists these).
        Ok(self.bound(&a.looks, vocab, c.encode_utf8(&mut buf).as_bytes()) / a.z)
    }

    /// The top-`top_k` next characters, P(EOS) and the residual.
    pub async fn distribution<M: NextTokenModel>(
        &mut self,
        top_k: usize,
        vocab: &Vocab,
        model: &mut M,
    ) -> Result<CharDistribution, M::Error> {
        if self.analysis.is_none() {
            let a = self.analyse(vocab, model).await?;
            self.analysis = Some(a);
        }
        let Some(a) = &self.analysis else {
            return Ok(CharDistribution {
                chars: vec![],
                eos: 0.0,
                residual: 1.0,
            });
        };
        if a.z <= 0.0 || !a.z.is_finite() {
            return Ok(CharDistribution {
                chars: vec![],
                eos: 0.0,
                residual: 1.0,
            });
        }
        let mut heap = BinaryHeap::new();
        let mut bytes = Vec::new();
        for h in &self.hyps {
            child_bytes(vocab, &h.rem, &mut bytes);
        }
        bytes.sort_unstable();
        bytes.dedup();
        for &b in &bytes {
            if utf8_len(b).is_some() {
                let u = self.bound(&a.looks, vocab, &[b]);
                if u > 0.0 {
                    heap.push(Node(u, vec![b]));
                }
            }
        }
        let mut chars = Vec::with_capacity(top_k);
        let mut key = Vec::new();
        while let Some(Node(u, beta)) = heap.pop() {
            if chars.len() >= top_k {
                break;
            }
            match classify(&beta) {
                Start::Complete(n) if n == beta.len() => {
                    if let Some(c) = std::str::from_utf8(&beta).ok().and_then(|s| s.chars().next()) {
                        chars.push((c, u / a.z));
                    }
                }
                Start::Incomplete => {
                    bytes.clear();
                    for h in &self.hyps {
                        key.clear();
                        key.extend_from_slice(&h.rem);
                        key.extend_from_slice(&beta);
                        child_bytes(vocab, &key, &mut bytes);
                    }
                    for l in &a.looks {
                        if beta.starts_with(&l.pend) {
                            child_bytes(vocab, &beta[l.pend.len()..], &mut bytes);
                        }
                    }
                    bytes.sort_unstable();
                    bytes.dedup();
                    for &x in &bytes {
                        let mut child = beta.clone();
                        child.push(x);
                        if classify(&child) != Start::Invalid {
                            let cu = self.bound(&a.looks, vocab, &child);
                            if cu > 0.0 {
                                heap.push(Node(cu, child));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        let eos = a.eos / a.z;
        let listed: f64 = chars.iter().map(|c| c.1).sum();
        Ok(CharDistribution {
            chars,
            eos,
            residual: (1.0 - listed - eos).max(0.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::TokenizerKind;
    use rand::{Rng, SeedableRng, rngs::StdRng};
    use std::hash::{Hash, Hasher};

    /// Deterministic random next-token distributions: a seeded function of the token sequence, with a
    /// random temperature so that some distributions are peaked.
    struct Synth {
        n: usize,
        seed: u64,
    }

    impl NextTokenModel for Synth {
        type Error = std::convert::Infallible;
        async fn next_probs(&mut self, tokens: &[u32]) -> Result<Arc<[f32]>, Self::Error> {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (self.seed, tokens).hash(&mut h);
            let mut rng = StdRng::seed_from_u64(h.finish());
            let temp = 0.3 + 3.0 * rng.random::<f64>();
            let logits: Vec<f64> = (0..self.n).map(|_| rng.random::<f64>() * 4.0 / temp).collect();
            let max = logits.iter().copied().fold(f64::MIN, f64::max);
            let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
            let s: f64 = e.iter().sum();
            Ok(e.iter().map(|x| (x / s) as f32).collect::<Vec<f32>>().into())
        }
    }

    fn probs(m: &mut Synth, t: &[u32]) -> Arc<[f32]> {
        match now(m.next_probs(t)) {
            Ok(p) => p,
            Err(e) => match e {},
        }
    }

    /// P(the byte stream after `tokens` starts with `need`), by enumerating token paths.
    fn bf_prefix(m: &mut Synth, v: &Vocab, tokens: &[u32], need: &[u8]) -> f64 {
        let p = probs(m, tokens);
        let mut sum = 0.0;
        for id in 0..v.n_rows() as u32 {
            let Some(b) = v.token_bytes(id) else { continue };
            if b.starts_with(need) {
                sum += f64::from(p[id as usize]);
            } else if need.starts_with(b) {
                let mut t = tokens.to_vec();
                t.push(id);
                sum += f64::from(p[id as usize]) * bf_prefix(m, v, &t, &need[b.len()..]);
            }
        }
        sum
    }

    /// P(the stream after `tokens` is exactly `need` then EOS).
    fn bf_eos(m: &mut Synth, v: &Vocab, tokens: &[u32], need: &[u8]) -> f64 {
        let p = probs(m, tokens);
        if need.is_empty() {
            return v.eos_ids().iter().map(|&e| f64::from(p[e as usize])).sum();
        }
        let mut sum = 0.0;
        for id in 0..v.n_rows() as u32 {
            let Some(b) = v.token_bytes(id) else { continue };
            if need.starts_with(b) {
                let mut t = tokens.to_vec();
                t.push(id);
                sum += f64::from(p[id as usize]) * bf_eos(m, v, &t, &need[b.len()..]);
            }
        }
        sum
    }

    /// Every character with mass after `committed`, by depth-first search over bytes.
    fn bf_chars(
        m: &mut Synth,
        v: &Vocab,
        start: &[u32],
        committed: &[u8],
        beta: &mut Vec<u8>,
        out: &mut Vec<(char, f64)>,
    ) {
        for b in 0..=255u8 {
            beta.push(b);
            let mut need = committed.to_vec();
            need.extend_from_slice(beta);
            match classify(beta) {
                Start::Invalid => {}
                Start::Complete(_) => {
                    let p = bf_prefix(m, v, start, &need);
                    if p > 0.0 {
                        let c = std::str::from_utf8(beta).ok().and_then(|s| s.chars().next());
                        out.extend(c.map(|c| (c, p)));
                    }
                }
                Start::Incomplete => {
                    if bf_prefix(m, v, start, &need) > 0.0 {
                        bf_chars(m, v, start, committed, beta, out);
                    }
                }
            }
            beta.pop();
        }
    }

    fn torture_vocab() -> Vocab {
        let pieces: Vec<&[u8]> = vec![
            b"a",
            b"b",
            b"c",
            b"ab",
            b"bc",
            b"abc",
            b"ca",
            b" ",
            b"a ",
            b" b",
            b"!",
            "é".as_bytes(),
            b"\xC3",
            b"\xA9",
            "é!".as_bytes(),
            "中".as_bytes(),
            b"\xE4\xB8",
            b"\xAD",
            b"\xE4",
            b"\xB8\xAD",
            "😀".as_bytes(),
            b"\xF0\x9F",
            b"\x98\x80",
            b"\xF0",
            b"\x9F",
            b"\x98",
            b"\x80",
            b"\xFF",
            b"a\xC3",
        ];
        let mut bytes: Vec<Option<Box<[u8]>>> = vec![None, None]; // 0 = EOS, 1 = BOS
        bytes.extend(pieces.into_iter().map(|p| Some(p.into())));
        Vocab::from_bytes(TokenizerKind::ByteLevel, bytes, &[0])
    }

    fn exact_opts() -> CharOptions {
        CharOptions {
            max_hypotheses: usize::MAX,
            min_mass: 0.0,
            lookahead: true,
        }
    }

    fn check_against_brute_force(v: &Vocab, seed: u64, remainder: &[u8], commits: &[&str]) {
        let mut m = Synth { n: v.n_rows(), seed };
        let start = vec![1u32];
        let Ok(mut st) = now(CharState::new(
            start.clone(),
            remainder.to_vec(),
            exact_opts(),
            v,
            &mut m,
        ));
        let mut committed = remainder.to_vec();
        for step in 0..=commits.len() {
            let Ok(d) = now(st.distribution(100_000, v, &mut m));
            let mut want = Vec::new();
            bf_chars(&mut m, v, &start, &committed, &mut Vec::new(), &mut want);
            let eos = bf_eos(&mut m, v, &start, &committed);
            let z: f64 = want.iter().map(|c| c.1).sum::<f64>() + eos;
            let ctx = format!("seed {seed}, committed {:?}", String::from_utf8_lossy(&committed));
            assert!(
                (d.eos - eos / z).abs() < 1e-9,
                "{ctx}: eos {} vs {}",
                d.eos,
                eos / z
            );
            assert_eq!(d.chars.len(), want.len(), "{ctx}: {:?} vs {want:?}", d.chars);
            for (c, p) in &want {
                let got = d.chars.iter().find(|x| x.0 == *c).map(|x| x.1).unwrap_or(-1.0);
                assert!((got - p / z).abs() < 1e-9, "{ctx}: {c:?} {got} vs {}", p / z);
            }
            assert!(d.residual < 1e-9, "{ctx}: residual {}", d.residual);
            assert!(d.chars.windows(2).all(|w| w[0].1 >= w[1].1));
            if let Some(c) = commits.get(step) {
                let Ok(()) = now(st.commit(c, v, &mut m));
                committed.extend_from_slice(c.as_bytes());
            }
        }
    }

    /// String-prefix masses against enumeration: P(the byte stream starts with C), and P(it is C and
    /// then ends).
    fn check_prefix_mass(v: &Vocab, seed: u64, remainder: &[u8], text: &str) {
        let mut m = Synth { n: v.n_rows(), seed };
        let start = vec![1u32];
        let Ok(mut st) = now(CharState::new(
            start.clone(),
            remainder.to_vec(),
            exact_opts(),
            v,
            &mut m,
        ));
        let mut need = remainder.to_vec();
        let bf = |m: &mut Synth, need: &[u8]| {
            if need.is_empty() {
                1.0
            } else {
                bf_prefix(m, v, &start, need)
            }
        };
        let base = bf(&mut m, &need);
        let got_base = st.prefix_mass(v);
        assert!(
            (got_base - base).abs() < 1e-9,
            "seed {seed}: base {got_base} vs {base}"
        );
        for c in text.chars() {
            let Ok(()) = now(st.commit(&c.to_string(), v, &mut m));
            need.extend_from_slice(c.to_string().as_bytes());
            let want = bf(&mut m, &need);
            let got = st.prefix_mass(v);
            assert!(
                (got - want).abs() < 1e-9,
                "seed {seed}, {:?}: {got} vs {want}",
                String::from_utf8_lossy(&need)
            );
            // The text as the whole rest of the answer: exactly these bytes, then EOS.
            let want = bf_eos(&mut m, v, &start, &need);
            let got = st.end_mass(v);
            assert!(
                (got - want).abs() < 1e-9,
                "seed {seed}, {:?} then EOS: {got} vs {want}",
                String::from_utf8_lossy(&need)
            );
        }
    }

    #[test]
    fn prefix_mass_matches_brute_force() {
        let v = torture_vocab();
        for seed in 0..6 {
            check_prefix_mass(&v, seed, b"", "abca b!");
            check_prefix_mass(&v, seed, b"a", "bc é!中😀");
            check_prefix_mass(&v, seed, b"\xC3", "\u{a9}ab");
        }
    }

    /// A word cut at every character: on real BPE, SentencePiece and character vocabularies each
    /// cut's string-prefix probability matches enumeration and never rises as the cut grows (each
    /// character multiplies it by its conditional probability), where a canonical tokenization of
    /// the cut would end in a rare token and collapse.
    #[test]
    fn prefix_mass_of_every_cut_matches_brute_force_on_fixture_tokenizers()
    -> Result<(), Box<dyn std::error::Error>> {
        use crate::fixtures;
        let corpus = &["the cat sat on the mat", "café 中文 😀 the end", "hello world"];
        let toks = [
            fixtures::byte_level_bpe(corpus, 300)?,
            fixtures::sentencepiece_bpe(corpus, 320)?,
            fixtures::char_level(corpus)?,
        ];
        for (seed, tok) in toks.iter().enumerate() {
            let v = Vocab::from_tokenizer(tok, tok.get_vocab_size(true), &[0])?;
            let mut m = Synth {
                n: v.n_rows(),
                seed: seed as u64,
            };
            let Ok(mut st) = now(CharState::new(vec![1], vec![], exact_opts(), &v, &mut m));
            let mut need = Vec::new();
            let mut last = 1.0;
            for c in " the mat".chars() {
                let Ok(()) = now(st.commit(&c.to_string(), &v, &mut m));
                need.extend_from_slice(c.to_string().as_bytes());
                let want = bf_prefix(&mut m, &v, &[1], &need);
                let got = st.prefix_mass(&v);
                assert!(
                    (got - want).abs() < 1e-9,
                    "{:?}: {got} vs {want}",
                    String::from_utf8_lossy(&need)
                );
                assert!(
                    got > 0.0 && got <= last + 1e-12,
                    "{:?}: {got} after {last}",
                    String::from_utf8_lossy(&need)
                );
                last = got;
            }
        }
        Ok(())
    }

    #[test]
    fn exact_method_matches_brute_force_on_multibyte_pieces() {
        let v = torture_vocab();
        for seed in 0..3 {
            check_against_brute_force(&v, seed, b"", &["a", "b", " ", "é", "中", "😀", "!"]);
            check_against_brute_force(&v, seed, b"ab", &["c", "a"]);
            check_against_brute_force(&v, seed, "中".as_bytes(), &["😀", "é"]);
            // A remainder that starts inside a character (the context's last token was a byte piece).
            check_against_brute_force(&v, seed, b"\xAD", &["a"]);
        }
    }

    #[test]
    fn exact_method_matches_brute_force_on_fixture_tokenizers() -> Result<(), Box<dyn std::error::Error>> {
        use crate::fixtures;
        let corpus = &["the cat sat on the mat", "café 中文 😀 the end", "hello world"];
        let toks = [
            fixtures::byte_level_bpe(corpus, 300)?,
            fixtures::sentencepiece_bpe(corpus, 320)?,
            fixtures::char_level(corpus)?,
        ];
        for tok in &toks {
            let n = tok.get_vocab_size(true);
            let v = Vocab::from_tokenizer(tok, n, &[0])?;
            for (seed, (ctx, commits)) in [
                ("the ca", vec!["t", " "]),
                ("caf", vec!["é", " "]),
                ("", vec!["中", "文"]),
            ]
            .iter()
            .enumerate()
            {
                let ids = tok
                    .encode(*ctx, false)
                    .map_err(|e| e.to_string())?
                    .get_ids()
                    .to_vec();
                let (prefix, rem) = match ids.split_last() {
                    Some((last, rest)) => {
                        let mut p = vec![1u32];
                        p.extend_from_slice(rest);
                        (p, v.token_bytes(*last).unwrap_or_default().to_vec())
                    }
                    None => (vec![1u32], vec![]),
                };
                let mut m = Synth { n, seed: seed as u64 };
                // Byte-level vocabularies spell every 4-byte character as byte pieces: following all of
                // them is ~10^6 paths, so drop look-ahead paths under 1e-7 of the mass.
                let opts = CharOptions {
                    min_mass: 1e-7,
                    ..exact_opts()
                };
                let Ok(mut st) = now(CharState::new(prefix.clone(), rem.clone(), opts, &v, &mut m));
                let mut committed = rem.clone();
                for step in 0..=commits.len() {
                    let Ok(d) = now(st.distribution(6, &v, &mut m));
                    // Ratios between the listed characters and EOS need no normaliser.
                    let eos = bf_eos(&mut m, &v, &prefix, &committed);
                    for (c, p) in &d.chars {
                        let mut need = committed.clone();
                        need.extend_from_slice(c.to_string().as_bytes());
                        let want = bf_prefix(&mut m, &v, &prefix, &need);
                        let (a, b) = (
                            p / d.chars[0].1,
                            want / {
                                let mut n0 = committed.clone();
                                n0.extend_from_slice(d.chars[0].0.to_string().as_bytes());
                                bf_prefix(&mut m, &v, &prefix, &n0)
                            },
                        );
                        assert!((a - b).abs() < 1e-6, "{ctx:?} step {step} {c:?}: {a} vs {b}");
                        if eos > 0.0 && d.eos > 0.0 {
                            assert!((d.eos / p - eos / want).abs() / (eos / want) < 1e-6);
                        }
                    }
                    if let Some(c) = commits.get(step) {
                        let Ok(()) = now(st.commit(c, &v, &mut m));
                        committed.extend_from_slice(c.as_bytes());
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn commits_inside_a_token_make_no_model_call() {
        let pieces: Vec<&[u8]> = vec![b"hello", b"help", b"he", b"world", b" "];
        let mut bytes: Vec<Option<Box<[u8]>>> = vec![None, None];
        bytes.extend(pieces.into_iter().map(|p| Some(p.into())));
        let v = Vocab::from_bytes(TokenizerKind::Plain, bytes, &[0]);
        let mut m = Synth {
            n: v.n_rows(),
            seed: 3,
        };
        let Ok(mut st) = now(CharState::new(vec![1], b"he".to_vec(), exact_opts(), &v, &mut m));
        assert_eq!(
            st.model_calls(),
            2,
            "the start, and the path that ends with \"he\""
        );
        let Ok(()) = now(st.commit("l", &v, &mut m));
        assert_eq!(st.model_calls(), 2, "inside \"hello\"/\"help\": no call");
        let Ok(d) = now(st.distribution(4, &v, &mut m));
        assert_eq!(st.model_calls(), 2);
        let chars: Vec<char> = d.chars.iter().map(|c| c.0).collect();
        assert_eq!(chars.len(), 2);
        assert!(chars.contains(&'l') && chars.contains(&'p'));
        assert!((d.chars.iter().map(|c| c.1).sum::<f64>() - 1.0).abs() < 1e-12);
        let Ok(()) = now(st.commit("p", &v, &mut m));
        assert_eq!(st.model_calls(), 3, "\"help\" ends a token: one call");
        assert_eq!(st.hypotheses(), 1);
    }

    #[test]
    fn published_variant_uses_the_canonical_path_only() {
        let v = torture_vocab();
        let mut m = Synth {
            n: v.n_rows(),
            seed: 1,
        };
        let opts = CharOptions {
            max_hypotheses: 1,
            min_mass: 0.0,
            lookahead: false,
        };
        let Ok(mut st) = now(CharState::new(vec![1], b"a".to_vec(), opts, &v, &mut m));
        assert_eq!(st.model_calls(), 1);
        assert_eq!(st.hypotheses(), 1);
        let Ok(d) = now(st.distribution(100, &v, &mut m));
        // Only tokens extending "a" count: "ab", "abc", "a ", "a\xC3" (the last is not a character).
        let p = probs(&mut m, &[1]);
        let id = |b: &[u8]| {
            (0..v.n_rows() as u32)
                .find(|&i| v.token_bytes(i) == Some(b))
                .map(|i| f64::from(p[i as usize]))
                .unwrap_or(0.0)
        };
        let z = id(b"ab") + id(b"abc") + id(b"a ");
        let pb = d.chars.iter().find(|c| c.0 == 'b').map(|c| c.1).unwrap_or(0.0);
        assert!((pb - (id(b"ab") + id(b"abc")) / z).abs() < 1e-9);
        assert_eq!(d.eos, 0.0);
    }
}

#[cfg(test)]
mod pruned_tests {
    use super::*;

    struct Flat(usize, u64);
    impl NextTokenModel for Flat {
        type Error = std::convert::Infallible;
        async fn next_probs(&mut self, tokens: &[u32]) -> Result<Arc<[f32]>, Self::Error> {
            use rand::{Rng, SeedableRng};
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (self.1, tokens).hash(&mut h);
            let mut rng = rand::rngs::StdRng::seed_from_u64(h.finish());
            let e: Vec<f64> = (0..self.0).map(|_| (rng.random::<f64>() * 3.0).exp()).collect();
            let s: f64 = e.iter().sum();
            Ok(e.iter().map(|x| (x / s) as f32).collect::<Vec<f32>>().into())
        }
    }

    #[test]
    fn pruned_distributions_sum_to_one() -> Result<(), Box<dyn std::error::Error>> {
        let corpus = &["the cat sat on the mat", "café 中文 😀 the end", "hello world"];
        let tok = crate::fixtures::byte_level_bpe(corpus, 300)?;
        let n = tok.get_vocab_size(true);
        let v = Vocab::from_tokenizer(&tok, n, &[0])?;
        for seed in 0..20 {
            let mut m = Flat(n, seed);
            let ids = tok
                .encode("the ca", false)
                .map_err(|e| e.to_string())?
                .get_ids()
                .to_vec();
            let (last, rest) = ids.split_last().ok_or("empty")?;
            let Ok(mut st) = now(CharState::new(
                rest.to_vec(),
                v.token_bytes(*last).unwrap_or_default().to_vec(),
                CharOptions::default(),
                &v,
                &mut m,
            ));
            for c in ["t", " ", "é"] {
                let Ok(d) = now(st.distribution(100_000, &v, &mut m));
                let total: f64 = d.chars.iter().map(|c| c.1).sum::<f64>() + d.eos;
                assert!(
                    (total - 1.0).abs() < 1e-6 && d.residual < 1e-6,
                    "seed {seed} before {c:?}: {total} {}",
                    d.residual
                );
                let Ok(()) = now(st.commit(c, &v, &mut m));
            }
        }
        Ok(())
    }
}
