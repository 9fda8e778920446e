//! Attention over many sequences at once on the CPU: one kernel call per layer for every row of a
//! [`super::Transformer::forward_chunks`] step (decode rows, scored candidates), each row attending
//! over its own cache and its own sequence's new rows.
//!
//! candle's general path costs ~15 small ops per sequence and layer (narrow, write, two matmuls,
//! softmax, reshapes), ~3–5 µs each: on sub-million-parameter models those ops, not the weights,
//! were the step, and batching 16 streams gained 1.2×. Here the new key/value rows are written in
//! place ([`KvWrite`], an in-place op on the cache's own storage) and the attention of every row runs
//! as plain loops over the cache slices (scores, soft-capping, softmax, value sum), split across the
//! kernel pool by (sequence, head) when the work is large enough to pay for it. Rows are computed
//! independently, in the same order whatever else is in the step, so a sequence's attention output
//! does not depend on its batch mates.
//!
//! Used for f32 caches on the CPU; other devices and dtypes keep candle's path.

use candle_core::{CpuStorage, DType, Layout, Storage, Tensor};
use rayon::prelude::*;

use super::kv::KvCache;

type CResult<T> = candle_core::Result<T>;

/// Scalar work (query × cached position × head dim) above which a step is split across threads.
const PARALLEL_WORK: usize = 1 << 15;

/// Score differences below this have weight 0: `exp` would be subnormal (below ~1e-37 of the
/// largest weight, invisible in the f32 sum) and subnormal arithmetic costs ~100× a normal one.
const MIN_EXP: f32 = -80.0;

/// The attention shape and options of a model.
#[derive(Debug, Clone, Copy)]
pub(super) struct AttnSpec {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub softcap: Option<f32>,
    pub window: Option<usize>,
}

/// Whether this kernel serves a cache on `device` holding `dtype`.
pub(super) fn supported(device: &candle_core::Device, dtype: DType) -> bool {
    device.is_cpu() && dtype == DType::F32
}

/// Writes rows `row..row + count` of a `(n, kv_heads, 1, head_dim)` source at positions
/// `pos..pos + count` of a `(1, kv_heads, capacity, head_dim)` cache storage, in place: one op for
/// all of a sequence's new rows (a 481-token prefill is one op per layer, not 481).
struct KvWrite {
    row: usize,
    pos: usize,
    count: usize,
}

impl candle_core::InplaceOp2 for KvWrite {
    fn name(&self) -> &'static str {
        "kv-write"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dl: &Layout, src: &CpuStorage, sl: &Layout) -> CResult<()> {
        let (CpuStorage::F32(d), CpuStorage::F32(s)) = (dst, src) else {
            candle_core::bail!("kv-write: f32 storage expected");
        };
        let (_, kvh, cap, hd) = dl.shape().dims4()?;
        let (n, skvh, one, shd) = sl.shape().dims4()?;
        if !dl.is_contiguous() || !sl.is_contiguous() || skvh != kvh || shd != hd || one != 1 {
            candle_core::bail!("kv-write: layouts {dl:?} and {sl:?} do not match");
        }
        if self.row + self.count > n || self.pos + self.count > cap {
            candle_core::bail!(
                "kv-write: rows {}..{} of {n}, positions {}..{} of {cap}",
                self.row,
                self.row + self.count,
                self.pos,
                self.pos + self.count
            );
        }
        let d0 = dl.start_offset();
        for i in 0..self.count {
            let s0 = sl.start_offset() + (self.row + i) * kvh * hd;
            for h in 0..kvh {
                let at = d0 + (h * cap + self.pos + i) * hd;
                d[at..at + hd].copy_from_slice(&s[s0 + h * hd..s0 + (h + 1) * hd]);
            }
        }
        Ok(())
    }
}

/// `e^d` for a softmax's `d = score − max ≤ 0`, 0 below [`MIN_EXP`]: Cephes' single-precision `expf`
/// (`d = n·ln 2 + r`, a degree-6 polynomial in `r`, `2ⁿ` from the exponent bits), within ~1 ulp of
/// libm's, branch-free so that a loop over a row's scores vectorises (libm's `expf`, one call per
/// score, was ~6% of a 16-stream step on a 0.9M model). Plain multiplies and adds (no fused ones),
/// so every CPU and vector width gives the same bits.
#[inline(always)]
fn exp_le0(d: f32) -> f32 {
    // 1.5 · 2²³: adding it rounds to an integer in the low mantissa bits (|d·log₂e| < 2²²).
    const ROUND: f32 = 12_582_912.0;
    let d = d.max(MIN_EXP);
    let shifted = d * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = d - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // n ∈ [-116, 0]: the low bits of `shifted` hold n + 2²², and n + 127 is a normal exponent.
    let e = (shifted.to_bits() as i32 - 0x4B40_0000 + 127) as u32;
    let v = y * f32::from_bits(e << 23);
    if d <= MIN_EXP { 0.0 } else { v }
}

/// Columns of a value sum kept in registers at a time: 16 on any CPU, 64 with AVX2 where the head has
/// them (eight 8-lane accumulators of the 16 registers; the same sums, four times the independent
/// chains of adds, one pass over the values instead of four).
const VCOLS: usize = 16;

/// `y[d] = Σ_t p[t] · v(t)[d]` over the rows `v(t)` of `old` (contiguous rows of `y.len()`) and then
/// `new(t)`, each element summed over `t` in order from 0 with a plain multiply and add (the bits of
/// `y = 0` then `y += p[t] · v(t)` row after row), `COLS` columns at a time with their partial sums
/// in registers: with the sum in memory every row cost a load, an add and a store per column, each
/// row's adds waiting on the last row's stores (~30% of the kernel's samples with 16-dimensional
/// heads). Returns `Σ_t p[t]` in order from 0, summed beside the first columns' products (a chain of
/// dependent adds of its own, which then overlaps theirs).
#[inline(always)]
fn weighted_rows<'a, const COLS: usize>(
    y: &mut [f32],
    p: &[f32],
    old: &[f32],
    new: impl Fn(usize) -> &'a [f32],
) -> f32 {
    let cols = y.len();
    let (p_old, p_new) = p.split_at(old.len() / cols.max(1));
    let mut sum = None;
    let mut c0 = 0;
    while c0 + COLS <= cols {
        let mut acc = [0f32; COLS];
        let mut s = 0f32;
        for (&pt, v) in p_old.iter().zip(old.chunks_exact(cols)) {
            let v = &v[c0..c0 + COLS];
            s += pt;
            for d in 0..COLS {
                acc[d] += pt * v[d];
            }
        }
        for (t, &pt) in p_new.iter().enumerate() {
            let v = &new(t)[c0..c0 + COLS];
            s += pt;
            for d in 0..COLS {
                acc[d] += pt * v[d];
            }
        }
        sum.get_or_insert(s);
        y[c0..c0 + COLS].copy_from_slice(&acc);
        c0 += COLS;
    }
    if c0 < cols {
        let ys = &mut y[c0..];
        ys.fill(0.0);
        for (&pt, v) in p_old.iter().zip(old.chunks_exact(cols)) {
            for (yd, vd) in ys.iter_mut().zip(&v[c0..cols]) {
                *yd += pt * vd;
            }
        }
        for (t, &pt) in p_new.iter().enumerate() {
            for (yd, vd) in ys.iter_mut().zip(&new(t)[c0..cols]) {
                *yd += pt * vd;
            }
        }
    }
    sum.unwrap_or_else(|| p.iter().fold(0f32, |acc, s| acc + s))
}

/// The largest of `x` (`-inf` when empty) over eight lanes: a maximum is exact, so the lanes give the
/// value a running maximum gives (at most the sign of a zero differs, which `s - max` then ignores).
#[inline(always)]
fn max_of(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let (chunks, tail) = x.as_chunks::<8>();
    for c in chunks {
        for l in 0..8 {
            m[l] = m[l].max(c[l]);
        }
    }
    m.into_iter()
        .chain(tail.iter().copied())
        .fold(f32::NEG_INFINITY, f32::max)
}

/// `a · b` over eight independent lanes (vectorised; the lane order is fixed, so a row's result
/// never depends on its batch mates).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = DOT_LANES;
    let mut acc = [0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..L {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Lanes of [`dot`]'s partial sums, and keys scored at once by [`x86::dots8`].
const DOT_LANES: usize = 8;

/// [`dot`]'s scores of one query against `count` keys `stride` apart in `keys` (key `t` at
/// `t * stride`), eight keys at a time where the CPU has AVX2 and the head's length is a whole number
/// of lanes (the same bits), pushed scaled by `scale`.
#[inline(always)]
fn push_scores<const AVX2: bool>(
    q: &[f32],
    (keys, stride, count): (&[f32], usize, usize),
    scale: f32,
    scores: &mut Vec<f32>,
) {
    let hd = q.len();
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut t = 0;
    #[cfg(target_arch = "x86_64")]
    if AVX2 && hd % DOT_LANES == 0 {
        while t + DOT_LANES <= count {
            let group = &keys[t * stride..(t + DOT_LANES - 1) * stride + hd];
            // SAFETY: `AVX2` is only set by `head_avx2`, whose caller checked the CPU; `group`
            // holds 8 keys `stride` apart.
            #[allow(unsafe_code)]
            let d = unsafe { x86::dots8(q, group, stride) };
            scores.extend(d.map(|d| d * scale));
            t += DOT_LANES;
        }
    }
    for t in t..count {
        scores.push(dot(q, &keys[t * stride..t * stride + hd]) * scale);
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    /// [`super::dot`] of `q` with each of the 8 keys of `keys`, `stride` apart (rows of `q.len()`, a
    /// multiple of 8),
    /// bit for bit: each key's 8 lanes are summed over the chunks in order (from zero, a plain multiply
    /// then add), then the lanes in order from `Iterator::sum`'s start, then `dot`'s empty tail. The
    /// 8 × 8 partial sums are transposed so that the last sum runs across keys, one vector add per
    /// lane, instead of across a vector's lanes once per key (2.5 → 1.0 ns per 16-dimensional key).
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots8(q: &[f32], keys: &[f32], stride: usize) -> [f32; 8] {
        let hd = q.len();
        assert!(hd % 8 == 0 && stride >= hd && keys.len() >= 7 * stride + hd);
        let mut acc = [_mm256_setzero_ps(); 8];
        for c in (0..hd).step_by(8) {
            // SAFETY: `c + 8 <= hd` and `k * stride + c + 8 <= 7 * stride + hd <= keys.len()`.
            let qv = unsafe { _mm256_loadu_ps(q.as_ptr().add(c)) };
            for (k, a) in acc.iter_mut().enumerate() {
                let kv = unsafe { _mm256_loadu_ps(keys.as_ptr().add(k * stride + c)) };
                *a = _mm256_add_ps(*a, _mm256_mul_ps(qv, kv));
            }
        }
        let [r0, r1, r2, r3, r4, r5, r6, r7] = acc;
        // Keys interleaved in pairs, then pairs of pairs: lanes (l | l + 4) of keys 0-3 and 4-7.
        let pairs = |a, b| (_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
        let quads = |a, b| (_mm256_shuffle_ps::<0x44>(a, b), _mm256_shuffle_ps::<0xEE>(a, b));
        let ((t0, t1), (t2, t3), (t4, t5), (t6, t7)) =
            (pairs(r0, r1), pairs(r2, r3), pairs(r4, r5), pairs(r6, r7));
        let ((u0, u1), (u2, u3), (u4, u5), (u6, u7)) =
            (quads(t0, t2), quads(t1, t3), quads(t4, t6), quads(t5, t7));
        // Lane l of every key, l = 0..8: the low 128-bit halves hold lanes 0-3, the high ones 4-7.
        let lanes = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        let start = _mm256_set1_ps(std::iter::empty::<f32>().sum::<f32>());
        let mut sum = start;
        for l in lanes {
            sum = _mm256_add_ps(sum, l);
        }
        sum = _mm256_add_ps(sum, start);
        let mut out = [0f32; 8];
        // SAFETY: `out` holds 8 floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sum) };
        out
    }
}

/// The f32 slice a contiguous CPU tensor's layout reads, from its start offset.
fn f32_slice<'a>(storage: &'a Storage, layout: &Layout) -> CResult<&'a [f32]> {
    match storage {
        Storage::Cpu(c) if layout.is_contiguous() => Ok(&c.as_slice::<f32>()?[layout.start_offset()..]),
        _ => candle_core::bail!("ragged attention: a contiguous f32 CPU tensor expected"),
    }
}

/// One sequence's rows in a [`chunk_attention`] step: `rows` new positions right after `cache.len`.
/// When `write`, their keys and values are written into the cache's storage (claimed by
/// `for_append`); otherwise the cache is only read (a candidate scored over a shared context).
pub(super) struct SeqRows<'a> {
    pub cache: &'a KvCache,
    pub rows: usize,
    pub write: bool,
}

/// A sequence's cached `((keys, values, capacity), len, first row)` in a step.
type Cached<'a> = ((&'a [f32], &'a [f32], usize), usize, usize);

/// What every (row, head) of a [`chunk_attention`] step reads: the step's queries and new keys and
/// values, each sequence's cached slices `((keys, values, capacity), len, first row)`, and each
/// row's `(sequence, index within it)`.
struct Heads<'a> {
    spec: AttnSpec,
    qv: &'a [f32],
    kn: &'a [f32],
    vn: &'a [f32],
    cached: Vec<Cached<'a>>,
    row_seq: Vec<(usize, usize)>,
}

/// [`Heads::head`] compiled for AVX2: the same operations (plain multiplies and adds, no fused
/// ones) on 8 lanes instead of the baseline's 4, the scores eight keys at a time ([`x86::dots8`]) and
/// 64-dimensional heads' value sums 64 columns at a time, all in the baseline build's order, so the
/// bits are those of the baseline build.
///
/// # Safety
/// The CPU must have AVX2 and FMA ([`super::matvec::avx2_fma`]).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn head_avx2(heads: &Heads, idx: usize, y: &mut [f32], scores: &mut Vec<f32>) {
    heads.head::<true>(idx, y, scores);
}

impl Heads<'_> {
    /// Row `r`'s position and the first position its window sees.
    fn span(&self, r: usize) -> (usize, usize) {
        let (j, i) = self.row_seq[r];
        let pos = self.cached[j].1 + i;
        (pos, self.spec.window.map_or(0, |w| (pos + 1).saturating_sub(w)))
    }

    /// (row, head) `idx`'s output into `y`, on the widest vectors the CPU has.
    fn run(&self, avx2: bool, idx: usize, y: &mut [f32], scores: &mut Vec<f32>) {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: `avx2` is `matvec::avx2_fma()`: the CPU has AVX2 and FMA.
            #[allow(unsafe_code)]
            unsafe {
                head_avx2(self, idx, y, scores)
            };
            return;
        }
        let _ = avx2;
        self.head::<false>(idx, y, scores);
    }

    /// Scores, soft-capping, softmax and the value sum of (row, head) `idx` over its cached
    /// positions and its sequence's new rows up to itself.
    #[inline(always)]
    fn head<const AVX2: bool>(&self, idx: usize, y: &mut [f32], scores: &mut Vec<f32>) {
        let (h, kvh, hd, spec) = (self.spec.heads, self.spec.kv_heads, self.spec.head_dim, self.spec);
        let (r, hi) = (idx / h, idx % h);
        let ((kc, vc, cap), len, first) = self.cached[self.row_seq[r].0];
        let (pos, start) = self.span(r);
        let g = hi / (h / kvh);
        let qh = &self.qv[(r * h + hi) * hd..(r * h + hi + 1) * hd];
        // Cached positions `start..len`, then the sequence's new positions up to `pos`.
        let base = g * cap * hd;
        let old = start.min(len);
        let new_rows = first + start.max(len) - len..=first + pos - len;
        let at = |rr: usize| (rr * kvh + g) * hd..(rr * kvh + g + 1) * hd;
        // Two plain loops (the cache's slice, then the new rows) rather than one chained iterator:
        // with short heads (16 dims) the iterator's bookkeeping cost as much as the products.
        let old_keys = &kc[base + old * hd..base + len * hd];
        let old_values = &vc[base + old * hd..base + len * hd];
        scores.clear();
        scores.reserve(old_keys.len() / hd + new_rows.clone().count());
        push_scores::<AVX2>(qh, (old_keys, hd, old_keys.len() / hd), spec.scale, scores);
        // The new rows' keys, `kv_heads · hd` apart in the step's keys.
        let n_new = new_rows.clone().count();
        let new_keys = &self.kn[at(*new_rows.start()).start..];
        push_scores::<AVX2>(qh, (new_keys, kvh * hd, n_new), spec.scale, scores);
        if let Some(cap) = spec.softcap {
            for s in scores.iter_mut() {
                *s = (*s / cap).tanh() * cap;
            }
        }
        let max = max_of(scores);
        for s in scores.iter_mut() {
            *s = exp_le0(*s - max);
        }
        let new_first = *new_rows.start();
        let new_values = |t| &self.vn[at(new_first + t)];
        let sum = if AVX2 && hd % 64 == 0 {
            weighted_rows::<64>(y, scores, old_values, new_values)
        } else {
            weighted_rows::<VCOLS>(y, scores, old_values, new_values)
        };
        for yd in y.iter_mut() {
            *yd /= sum;
        }
    }
}

/// One step's attention for layer `li` over several sequences, each contributing one or more new
/// positions (decode rows, scored candidates): the rows of `q` `(n, heads, 1, head_dim)` are the
/// sequences' rows in order; row `i` of a sequence sits at position `cache.len + i` and attends
/// over the cached positions and its own sequence's new rows up to itself (causal, the sliding
/// window applied), the new keys and values read from `k`, `v` `(n, kv_heads, 1, head_dim)`.
/// Every row sums its positions in order, so a row's output does not depend on the rest of the
/// step. Returns `(n, 1, heads * head_dim)` f32.
pub(super) fn chunk_attention(
    spec: &AttnSpec,
    li: usize,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    seqs: &[SeqRows],
) -> CResult<Tensor> {
    let n: usize = seqs.iter().map(|s| s.rows).sum();
    let (h, hd) = (spec.heads, spec.head_dim);
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    // The cached storage of each sequence (none for an empty cache) and where its rows start.
    let mut stores = Vec::with_capacity(seqs.len());
    let mut first = 0;
    for s in seqs {
        let layer = if s.cache.len == 0 && !s.write {
            None
        } else {
            let Some((kb, vb)) = s.cache.layers.get(li) else {
                candle_core::bail!("KV cache has no layer {li}");
            };
            if s.write {
                let at = KvWrite {
                    row: first,
                    pos: s.cache.len,
                    count: s.rows,
                };
                kb.inplace_op2(&k, &at)?;
                vb.inplace_op2(&v, &at)?;
            }
            Some((kb, vb, kb.dim(2)?))
        };
        stores.push((layer, s.cache.len, first));
        first += s.rows;
    }
    let mut row_seq = Vec::with_capacity(n);
    for (j, s) in seqs.iter().enumerate() {
        row_seq.extend((0..s.rows).map(|i| (j, i)));
    }
    let q = q.contiguous()?;
    let (qs, ql) = q.storage_and_layout();
    let qv = f32_slice(&qs, ql)?;
    let (ks, kl) = k.storage_and_layout();
    let kn = f32_slice(&ks, kl)?;
    let (vs, vl) = v.storage_and_layout();
    let vn = f32_slice(&vs, vl)?;
    let mut guards = Vec::with_capacity(stores.len());
    for (layer, len, first) in &stores {
        let g = layer
            .as_ref()
            .map(|(kb, vb, cap)| (kb.storage_and_layout(), vb.storage_and_layout(), *cap));
        guards.push((g, *len, *first));
    }
    let mut cached = Vec::with_capacity(guards.len());
    for (g, len, first) in &guards {
        let slices = match g {
            Some(((ks, kl), (vs, vl), cap)) => (f32_slice(ks, kl)?, f32_slice(vs, vl)?, *cap),
            None => (&[][..], &[][..], 0),
        };
        cached.push((slices, *len, *first));
    }
    let heads = Heads {
        spec: *spec,
        qv,
        kn,
        vn,
        cached,
        row_seq,
    };
    let avx2 = super::matvec::avx2_fma();
    let mut out = vec![0f32; n * h * hd];
    let work: usize = (0..n)
        .map(|r| heads.span(r))
        .map(|(pos, start)| pos + 1 - start)
        .sum::<usize>()
        * h
        * hd;
    if work >= PARALLEL_WORK {
        out.par_chunks_mut(hd)
            .enumerate()
            .for_each_init(Vec::new, |scores, (idx, y)| heads.run(avx2, idx, y, scores));
    } else {
        let mut scores = Vec::new();
        for (idx, y) in out.chunks_mut(hd).enumerate() {
            heads.run(avx2, idx, y, &mut scores);
        }
    }
    drop(heads);
    drop(guards);
    Tensor::from_vec(out, (n, 1, h * hd), q.device())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Eight keys at once give `dot`'s bits, signed zeros and all, for heads of 8 to 64 dimensions,
    /// contiguous or strided.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn eight_keys_at_once_score_bit_for_bit_like_one_at_a_time() {
        if !super::super::matvec::avx2_fma() {
            return;
        }
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // Mostly ordinary values, some exact zeros of either sign and some large ones.
            match seed % 16 {
                0 => 0.0,
                1 => -0.0,
                2 => (seed >> 20) as f32 * 1e3,
                _ => ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5,
            }
        };
        for hd in [8, 16, 32, 64] {
            // Contiguous keys (the cache) and keys of one head among four (a step's new rows).
            for stride in [hd, 4 * hd] {
                for _ in 0..300 {
                    let q: Vec<f32> = (0..hd).map(|_| next()).collect();
                    let keys: Vec<f32> = (0..7 * stride + hd).map(|_| next()).collect();
                    // SAFETY: the CPU has AVX2 (checked above).
                    #[allow(unsafe_code)]
                    let got = unsafe { x86::dots8(&q, &keys, stride) };
                    for (k, g) in got.iter().enumerate() {
                        let want = dot(&q, &keys[k * stride..k * stride + hd]);
                        assert_eq!(g.to_bits(), want.to_bits(), "hd {hd}, key {k}: {g} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn softmax_exp_is_within_two_ulps_of_libm_and_zero_below_the_floor() {
        let mut worst = 0f32;
        for i in 0..800_000 {
            let d = -(i as f32) * 1e-4;
            let (got, want) = (exp_le0(d), d.exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst <= 2.0 * f32::EPSILON, "worst relative error {worst:e}");
        assert_eq!(exp_le0(0.0), 1.0);
        assert_eq!(exp_le0(MIN_EXP), 0.0);
        assert_eq!(exp_le0(-1e30), 0.0);
        assert_eq!(exp_le0(f32::NEG_INFINITY), 0.0);
    }
}
