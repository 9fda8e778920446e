//! Products of a weight with a few rows, `y = x·Wᵀ` for `x` `(n, cols)` with `n` up to [`MAX_ROWS`]:
//! a decode step (one row per sequence) on every kernel thread, with each weight read once.
//!
//! candle sends a one-row f32 matmul to `gemm`'s matrix-vector path, which runs on one thread: at
//! batch 1 a decode step then streams every weight through one core (measured at 150M parameters:
//! ~1.0 core used, ~9.4 GB/s, while llama.cpp used 1.9). For a few rows (a batched decode step)
//! `gemm` packs the weight into panels and runs its microkernel over 6-column strips: at 16 rows and
//! 25M parameters, where the weights come from memory rather than cache, a step cost ~3× its
//! isolated products. Here the rows of `W` are split over the kernel pool and each thread streams
//! its rows of `W` once, in blocks of a few rows of `W` against several rows of `x` with the
//! accumulators in registers (`x` stays in cache). The instruction set is detected once at run time: AVX-512
//! (16 lanes, 6 × 4 blocks), AVX2 + FMA (8 lanes, 4 × 3 blocks), or portable code (8 lanes, 4 × 1).
//! While a block's products run, the x86 kernels prefetch the same columns of the next block's rows
//! of `W`: the weights come from memory, and the hardware prefetcher alone left the loads waiting
//! (at 25M parameters a 16-row step's products went from ~15 to ~9.5 ms, a one-row step's from ~6.2
//! to ~4.5 ms, on the 2-core AVX-512 machine).
//!
//! **A row's result does not depend on its batch mates**: on a given kernel every dot product is
//! summed the same way (the lanes over whole chunks in order, then the lanes in a fixed order, then
//! the tail), whatever block it falls in, so a decode step of up to [`MAX_ROWS`] sequences gives
//! bit-identical logits to the same sequence stepped alone. The x86 block types are reached only through
//! [`run_task`], which picks them after detection (their `block`s call `target_feature` code).

use candle_core::{CpuStorage, Layout, Shape, Tensor};
use rayon::prelude::*;

type CResult<T> = candle_core::Result<T>;

/// Most rows of `x` this product takes; more go to candle's gemm (prefill).
pub(super) const MAX_ROWS: usize = 32;

/// Multiply-adds below which a product runs on the calling thread (a wake-up costs more).
const PARALLEL_WORK: usize = 1 << 18;

/// Tasks own multiples of this many rows of `W` (a whole number of every kernel's blocks).
const W_BLOCK: usize = 12;

/// Rows of `W` per task: enough work per task to amortise the scheduling (~64 K multiply-adds).
fn rows_per_task(rows: usize, work_per_row: usize, threads: usize) -> usize {
    let by_work = (1usize << 16).div_ceil(work_per_row.max(1));
    let by_threads = rows.div_ceil(4 * threads.max(1));
    by_work
        .max(by_threads)
        .next_multiple_of(W_BLOCK)
        .clamp(1, rows.max(1))
}

/// How a block of dot products is computed: each implementation sums every product the same way
/// whatever the block (partial sums over whole chunks of its lane count in order, the lanes reduced
/// in a fixed order, then the tail in order), so that a row's result never depends on its batch mates.
trait Kernel {
    /// The dot products of `A` rows of `W` with `B` rows of `x` (all of one length).
    fn block<const A: usize, const B: usize>(ws: [&[f32]; A], xs: [&[f32]; B]) -> [[f32; B]; A];
}

/// Any CPU: 8 partial sums per product, vectorised as the compiler can.
struct Portable;

impl Kernel for Portable {
    #[inline(always)]
    fn block<const A: usize, const B: usize>(ws: [&[f32]; A], xs: [&[f32]; B]) -> [[f32; B]; A] {
        std::array::from_fn(|a| {
            std::array::from_fn(|b| {
                let (wc, wt) = ws[a].as_chunks::<8>();
                let (xc, xt) = xs[b].as_chunks::<8>();
                let mut acc = [0f32; 8];
                for (w, x) in wc.iter().zip(xc) {
                    for l in 0..8 {
                        acc[l] += w[l] * x[l];
                    }
                }
                let mut tail = 0f32;
                for (w, x) in wt.iter().zip(xt) {
                    tail += w * x;
                }
                acc.iter().sum::<f32>() + tail
            })
        })
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! AVX2 and AVX-512 blocks with explicit intrinsics (the compiler's vectoriser kept the
    //! accumulators of a multi-row block in memory).
    #![allow(unsafe_code)]

    use std::arch::x86_64::*;

    /// AVX2 + FMA: 8 lanes per product, blocks of 4 rows of `W` by 3 of `x` (12 accumulators).
    pub(super) struct Avx2;

    /// AVX-512: 16 lanes per product, blocks of 6 by 4 (24 accumulators of the 32 registers).
    pub(super) struct Avx512;

    /// One block's products with `$lanes`-wide registers: accumulate over whole chunks, sum each
    /// accumulator's lanes (`$hsum`, a fixed order), then the tail.
    macro_rules! simd_block {
        ($name:ident, $features:literal, $isa:literal, $vec:ty, $lanes:literal, $zero:ident, $load:ident, $fma:ident, $hsum:ident) => {
            #[doc = concat!("The products of one block on ", $isa, ".")]
            ///
            /// # Safety
            #[doc = concat!("The CPU must have ", $isa, "; every slice must have the length of `ws[0]`.")]
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn $name<const A: usize, const B: usize>(
                ws: [&[f32]; A],
                xs: [&[f32]; B],
            ) -> [[f32; B]; A] {
                let cols = ws[0].len();
                let chunks = cols / $lanes;
                let mut acc: [[$vec; B]; A] = [[$zero(); B]; A];
                for i in 0..chunks {
                    // SAFETY: (i + 1) * lanes <= cols, the length of every slice.
                    let xv: [$vec; B] =
                        std::array::from_fn(|b| unsafe { $load(xs[b].as_ptr().add(i * $lanes)) });
                    for a in 0..A {
                        // The same columns `A` rows on: the next block's weights, on their way
                        // from memory while this block's products run (a hint: never faults).
                        _mm_prefetch::<_MM_HINT_T0>(
                            ws[a].as_ptr().wrapping_add(i * $lanes + A * cols) as *const i8
                        );
                        // SAFETY: as above.
                        let wv = unsafe { $load(ws[a].as_ptr().add(i * $lanes)) };
                        for b in 0..B {
                            acc[a][b] = $fma(wv, xv[b], acc[a][b]);
                        }
                    }
                }
                let mut out = [[0f32; B]; A];
                for a in 0..A {
                    for b in 0..B {
                        // SAFETY: same CPU features as this function.
                        let mut sum = unsafe { $hsum(acc[a][b]) };
                        for k in chunks * $lanes..cols {
                            sum = ws[a][k].mul_add(xs[b][k], sum);
                        }
                        out[a][b] = sum;
                    }
                }
                out
            }
        };
    }

    /// The lanes of an AVX2 register summed as a fixed tree (halves, then pairs, then the last
    /// two: `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`), in registers: with short rows (hidden 128)
    /// a store and eight dependent scalar adds per product took as long as the products.
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn hsum_avx2(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let t = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps::<0b01>(t, t)))
    }

    /// The lanes of an AVX-512 register summed in order.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline]
    unsafe fn hsum_avx512(v: __m512) -> f32 {
        let mut lanes = [0f32; 16];
        // SAFETY: `lanes` holds one register's floats.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), v) };
        lanes.iter().sum::<f32>()
    }

    simd_block!(
        block_avx2,
        "avx2,fma",
        "AVX2 and FMA",
        __m256,
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_fmadd_ps,
        hsum_avx2
    );
    simd_block!(
        block_avx512,
        "avx512f,avx2,fma",
        "AVX-512F",
        __m512,
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_fmadd_ps,
        hsum_avx512
    );

    fn same_lengths(ws: &[&[f32]], xs: &[&[f32]]) -> bool {
        let n = ws.first().map_or(0, |w| w.len());
        ws.iter().chain(xs).all(|s| s.len() == n)
    }

    impl super::Kernel for Avx2 {
        #[inline(always)]
        fn block<const A: usize, const B: usize>(ws: [&[f32]; A], xs: [&[f32]; B]) -> [[f32; B]; A] {
            assert!(
                same_lengths(&ws, &xs),
                "few-rows matmul: rows of different lengths"
            );
            // SAFETY: only reached from `task_avx2`, which runs on CPUs with AVX2 and FMA; lengths
            // checked above.
            unsafe { block_avx2(ws, xs) }
        }
    }

    impl super::Kernel for Avx512 {
        #[inline(always)]
        fn block<const A: usize, const B: usize>(ws: [&[f32]; A], xs: [&[f32]; B]) -> [[f32; B]; A] {
            assert!(
                same_lengths(&ws, &xs),
                "few-rows matmul: rows of different lengths"
            );
            // SAFETY: only reached from `task_avx512`, which runs on CPUs with AVX-512F; lengths
            // checked above.
            unsafe { block_avx512(ws, xs) }
        }
    }
}

/// Every row of `x` against `A` rows of `W` from `first` (`yt`: their `(A, n)` outputs), `XB` rows
/// of `x` at a time.
#[inline(always)]
fn rows_block<K: Kernel, const A: usize, const XB: usize>(
    w: &[f32],
    x: &[f32],
    cols: usize,
    n: usize,
    first: usize,
    yt: &mut [f32],
) {
    let wr: [&[f32]; A] = std::array::from_fn(|a| &w[(first + a) * cols..(first + a + 1) * cols]);
    let xr = |j: usize| &x[j * cols..(j + 1) * cols];
    let mut j = 0;
    while j + XB <= n {
        let d = K::block::<A, XB>(wr, std::array::from_fn(|b| xr(j + b)));
        for (a, row) in d.iter().enumerate() {
            yt[a * n + j..a * n + j + XB].copy_from_slice(row);
        }
        j += XB;
    }
    while j < n {
        let d = K::block::<A, 1>(wr, [xr(j)]);
        for (a, row) in d.iter().enumerate() {
            yt[a * n + j] = row[0];
        }
        j += 1;
    }
}

/// `yt[k·n + j] = W[first + k] · x[j]` for the rows of `W` a task owns (`yt`: `(rows, n)`), in
/// blocks of `WB` rows of `W` by `XB` rows of `x`.
#[inline(always)]
fn task<K: Kernel, const WB: usize, const XB: usize>(
    w: &[f32],
    x: &[f32],
    cols: usize,
    n: usize,
    first: usize,
    yt: &mut [f32],
) {
    let rows = yt.len() / n;
    let mut k = 0;
    while k + WB <= rows {
        rows_block::<K, WB, XB>(w, x, cols, n, first + k, &mut yt[k * n..(k + WB) * n]);
        k += WB;
    }
    while k < rows {
        rows_block::<K, 1, XB>(w, x, cols, n, first + k, &mut yt[k * n..(k + 1) * n]);
        k += 1;
    }
}

/// [`task`] compiled for AVX-512: 6 × 4 blocks (24 accumulators of the 32 registers).
///
/// # Safety
/// The CPU must have AVX-512F ([`Isa::detect`]).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn task_avx512(w: &[f32], x: &[f32], cols: usize, n: usize, first: usize, yt: &mut [f32]) {
    task::<x86::Avx512, 6, 4>(w, x, cols, n, first, yt);
}

/// [`task`] compiled for AVX2 and FMA: 4 × 3 blocks (12 accumulators of the 16 registers).
///
/// # Safety
/// The CPU must have AVX2 and FMA ([`Isa::detect`]).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn task_avx2(w: &[f32], x: &[f32], cols: usize, n: usize, first: usize, yt: &mut [f32]) {
    task::<x86::Avx2, 4, 3>(w, x, cols, n, first, yt);
}

/// Whether the CPU has AVX2 and FMA (AVX-512 implies them), as detected for this kernel: other
/// kernels pick their x86 code by the same test.
pub(super) fn avx2_fma() -> bool {
    Isa::detect() != Isa::Portable
}

/// The instruction set the kernel is compiled for, detected once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    fn detect() -> Self {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                let fma =
                    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
                if fma && std::arch::is_x86_feature_detected!("avx512f") {
                    return Isa::Avx512;
                }
                if fma {
                    return Isa::Avx2;
                }
            }
            Isa::Portable
        })
    }

    /// Every kernel this CPU runs (the detected one and the slower ones).
    #[cfg(test)]
    fn available() -> Vec<Self> {
        match Self::detect() {
            Isa::Avx512 => vec![Isa::Avx512, Isa::Avx2, Isa::Portable],
            Isa::Avx2 => vec![Isa::Avx2, Isa::Portable],
            Isa::Portable => vec![Isa::Portable],
        }
    }
}

/// One task, on the kernel of `isa` (which this CPU must run: [`Isa::detect`] or slower).
fn run_task(isa: Isa, w: &[f32], x: &[f32], cols: usize, n: usize, first: usize, yt: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F, AVX2 and FMA (detected).
        #[allow(unsafe_code)]
        Isa::Avx512 => unsafe { task_avx512(w, x, cols, n, first, yt) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX2 and FMA (detected).
        #[allow(unsafe_code)]
        Isa::Avx2 => unsafe { task_avx2(w, x, cols, n, first, yt) },
        _ => task::<Portable, 4, 1>(w, x, cols, n, first, yt),
    }
}

struct FewRows;

impl candle_core::CustomOp2 for FewRows {
    fn name(&self) -> &'static str {
        "few-rows-matmul"
    }

    fn cpu_fwd(
        &self,
        ws: &CpuStorage,
        wl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (CpuStorage::F32(w), CpuStorage::F32(x)) = (ws, xs) else {
            candle_core::bail!("few-rows matmul: f32 storage expected");
        };
        let (rows, cols) = wl.shape().dims2()?;
        let (n, xcols) = xl.shape().dims2()?;
        let (Some((w0, w1)), Some((x0, x1))) = (wl.contiguous_offsets(), xl.contiguous_offsets()) else {
            candle_core::bail!("few-rows matmul: contiguous operands expected");
        };
        if xcols != cols || n == 0 {
            candle_core::bail!("few-rows matmul: x {n} x {xcols} for W {rows} x {cols}");
        }
        let (w, x) = (&w[w0..w1], &x[x0..x1]);
        let mut yt = vec![0f32; rows * n];
        if rows * cols * n < PARALLEL_WORK {
            run_task(Isa::detect(), w, x, cols, n, 0, &mut yt);
        } else {
            let per = rows_per_task(rows, cols * n, rayon::current_num_threads());
            yt.par_chunks_mut(per * n)
                .enumerate()
                .for_each(|(t, ys)| run_task(Isa::detect(), w, x, cols, n, t * per, ys));
        }
        let y = if n == 1 {
            yt
        } else {
            let mut y = vec![0f32; rows * n];
            for (o, ys) in yt.chunks_exact(n).enumerate() {
                for (j, v) in ys.iter().enumerate() {
                    y[j * rows + o] = *v;
                }
            }
            y
        };
        Ok((CpuStorage::F32(y), Shape::from((n, rows))))
    }
}

/// `x·Wᵀ` for `W` `(rows, cols)` and `x` `(n, cols)` (n ≤ [`MAX_ROWS`] to be worth it), both f32 on
/// the CPU: a `(n, rows)` tensor.
pub(super) fn few_rows(w: &Tensor, x: &Tensor) -> CResult<Tensor> {
    let w = w.contiguous()?;
    let x = x.contiguous()?;
    w.apply_op2_no_bwd(&x, &FewRows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `x·Wᵀ` `(n, rows)` on the kernel of `isa`, on the calling thread.
    fn product_on(isa: Isa, w: &Tensor, x: &Tensor) -> CResult<Vec<Vec<f32>>> {
        let (rows, cols) = w.dims2()?;
        let n = x.dim(0)?;
        let (wv, xv) = (
            w.flatten_all()?.to_vec1::<f32>()?,
            x.flatten_all()?.to_vec1::<f32>()?,
        );
        let mut yt = vec![0f32; rows * n];
        run_task(isa, &wv, &xv, cols, n, 0, &mut yt);
        Ok((0..n)
            .map(|j| (0..rows).map(|o| yt[o * n + j]).collect())
            .collect())
    }

    #[test]
    fn equals_candles_product_to_rounding_on_every_kernel() -> CResult<()> {
        for (rows, cols, n) in [
            (1, 1, 1),
            (3, 17, 2),
            (1408, 512, 1),
            (512, 1408, 16),
            (37, 1000, 7),
        ] {
            let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu)?;
            let x = Tensor::randn(0f32, 1.0, (n, cols), &Device::Cpu)?;
            let theirs = x.matmul(&w.t()?)?.to_vec2::<f32>()?;
            let mut results = vec![("parallel op", few_rows(&w, &x)?.to_vec2::<f32>()?)];
            for isa in Isa::available() {
                results.push((format!("{isa:?}").leak(), product_on(isa, &w, &x)?));
            }
            for (what, ours) in results {
                for (a, b) in ours.iter().flatten().zip(theirs.iter().flatten()) {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{what} {rows}x{cols}x{n}: {a} vs {b}"
                    );
                }
            }
        }
        Ok(())
    }

    /// On every kernel, each row's result is bit-identical alone and among others, wherever it sits
    /// (rows of `W` and of `x` not multiples of the blocks, columns not of the lanes).
    #[test]
    fn a_row_does_not_depend_on_its_batch_mates() -> CResult<()> {
        let (rows, cols) = (701, 515);
        let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu)?;
        let x = Tensor::randn(0f32, 1.0, (13, cols), &Device::Cpu)?;
        let all = few_rows(&w, &x)?.to_vec2::<f32>()?;
        for j in 0..13 {
            let alone = few_rows(&w, &x.narrow(0, j, 1)?)?.to_vec2::<f32>()?;
            assert_eq!(alone[0], all[j], "row {j}");
            let pair = few_rows(&w, &x.narrow(0, j.min(11), 2)?)?.to_vec2::<f32>()?;
            assert_eq!(pair[j - j.min(11)], all[j], "row {j} in a pair");
        }
        for isa in Isa::available() {
            let all = product_on(isa, &w, &x)?;
            for j in 0..13 {
                let alone = product_on(isa, &w, &x.narrow(0, j, 1)?)?;
                assert_eq!(alone[0], all[j], "{isa:?} row {j}");
                let five = product_on(isa, &w, &x.narrow(0, j.min(8), 5)?)?;
                assert_eq!(five[j - j.min(8)], all[j], "{isa:?} row {j} among five");
            }
        }
        Ok(())
    }
}
