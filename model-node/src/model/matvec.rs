//! The one-row product `y = W·x` of a decode step on every kernel thread.
//!
//! candle sends a one-row f32 matmul to `gemm`'s matrix-vector path, which runs on one thread: at
//! batch 1 a decode step then streams every weight through one core (measured at 150M parameters:
//! ~1.0 core used, ~9.4 GB/s, while llama.cpp used 1.9). Here the rows of `W` are split over the
//! kernel pool and each thread takes dot products of whole rows with `x` (16 independent partial
//! sums, which the compiler vectorises). Small matrices keep candle's path: below
//! [`PARALLEL_ELEMS`] a thread wake-up costs more than it saves.

use candle_core::{CpuStorage, Layout, Shape, Tensor};
use rayon::prelude::*;

type CResult<T> = candle_core::Result<T>;

/// Weight elements from which a one-row product is split across threads (a 512 × 512 matrix).
pub(super) const PARALLEL_ELEMS: usize = 1 << 18;

/// Rows per task: enough work per task to amortise the scheduling (~64 K multiply-adds).
fn rows_per_task(rows: usize, cols: usize, threads: usize) -> usize {
    let by_work = (1usize << 16).div_ceil(cols.max(1));
    let by_threads = rows.div_ceil(4 * threads.max(1));
    by_work.max(by_threads).clamp(1, rows.max(1))
}

/// `Σ a[i]·b[i]` with 16 independent partial sums.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}

struct MatVec;

impl candle_core::CustomOp2 for MatVec {
    fn name(&self) -> &'static str {
        "par-matvec"
    }

    fn cpu_fwd(
        &self,
        ws: &CpuStorage,
        wl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (CpuStorage::F32(w), CpuStorage::F32(x)) = (ws, xs) else {
            candle_core::bail!("par-matvec: f32 storage expected");
        };
        let (rows, cols) = wl.shape().dims2()?;
        let (Some((w0, w1)), Some((x0, x1))) = (wl.contiguous_offsets(), xl.contiguous_offsets()) else {
            candle_core::bail!("par-matvec: contiguous operands expected");
        };
        let (w, x) = (&w[w0..w1], &x[x0..x1]);
        if x.len() != cols {
            candle_core::bail!("par-matvec: {} inputs for {cols} columns", x.len());
        }
        let mut y = vec![0f32; rows];
        let per = rows_per_task(rows, cols, rayon::current_num_threads());
        y.par_chunks_mut(per).enumerate().for_each(|(t, ys)| {
            for (k, yk) in ys.iter_mut().enumerate() {
                let r = t * per + k;
                *yk = dot(&w[r * cols..(r + 1) * cols], x);
            }
        });
        Ok((CpuStorage::F32(y), Shape::from(rows)))
    }
}

/// `W·x` for `W` `(rows, cols)` and `x` of `cols` elements (any shape), both f32 on the CPU:
/// a `(rows,)` tensor.
pub(super) fn matvec(w: &Tensor, x: &Tensor) -> CResult<Tensor> {
    let w = w.contiguous()?;
    let x = x.flatten_all()?.contiguous()?;
    w.apply_op2_no_bwd(&x, &MatVec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn equals_candles_product_to_rounding() -> CResult<()> {
        for (rows, cols) in [(1, 1), (3, 17), (1408, 512), (512, 1408), (37, 1000)] {
            let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu)?;
            let x = Tensor::randn(0f32, 1.0, (1, cols), &Device::Cpu)?;
            let ours = matvec(&w, &x)?.to_vec1::<f32>()?;
            let theirs = x.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
            for (a, b) in ours.iter().zip(&theirs) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{rows}x{cols}: {a} vs {b}"
                );
            }
        }
        Ok(())
    }
}
