//! Where the forward pass gets its weights: a [`WeightSource`] answers HuggingFace tensor names
//! (`model.layers.0.self_attn.q_proj.weight`, ...) from safetensors (a candle `VarBuilder`) or from a
//! GGUF file ([`super::gguf::GgufWeights`], which maps the names to llama.cpp's), and [`Linear`] is a
//! projection either dense or quantized (`QMatMul` over GGML blocks).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

type CResult<T> = candle_core::Result<T>;

/// Rows up to which a dense product of more than [`super::matvec::MAX_ROWS`] rows runs as `W·xᵀ`;
/// above, as candle's `x·Wᵀ`, whose gemm takes the transposed weight as it is, without the two
/// transposing copies (a long prefill).
const GEMM_ROWS: usize = 256;

/// Tensors by their HuggingFace names.
pub trait WeightSource {
    /// Where the tensors go.
    fn device(&self) -> &Device;
    /// The dtype of the dense tensors.
    fn dtype(&self) -> DType;
    /// Whether `name` is present.
    fn contains(&self, name: &str) -> bool;
    /// The dense tensor `name` of `shape`, as [`WeightSource::dtype`].
    fn tensor(&self, name: &str, shape: &[usize]) -> CResult<Tensor>;
    /// The projection `prefix.weight` (`out × inp`) and, with `bias`, `prefix.bias`.
    fn linear(&self, prefix: &str, inp: usize, out: usize, bias: bool) -> CResult<Linear> {
        let w = self.tensor(&format!("{prefix}.weight"), &[out, inp])?;
        let b = if bias {
            Some(self.tensor(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear::dense(w, b))
    }
    /// Whether Gemma's norm weights are stored as they multiply (GGUF) rather than as offsets from 1
    /// (safetensors).
    fn norms_stored_whole(&self) -> bool {
        false
    }
    /// The embedding matrix as a projection (a tied LM head); by default the dense matrix.
    fn tied_head(&self, embed: &Tensor) -> CResult<Linear> {
        Ok(Linear::dense(embed.clone(), None))
    }
}

impl WeightSource for VarBuilder<'_> {
    fn device(&self) -> &Device {
        VarBuilder::device(self)
    }

    fn dtype(&self) -> DType {
        VarBuilder::dtype(self)
    }

    fn contains(&self, name: &str) -> bool {
        self.contains_tensor(name)
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> CResult<Tensor> {
        self.get(shape, name)
    }
}

/// Whether candle's quantized product of many rows by `q` runs its repacked int8 tiles, faster than
/// dequantizing for a prefill (Q8_0 at 150M parameters and 481 rows: 1.41 s against 1.84 s in f32 on
/// the AVX-512 machine): the CPU has VNNI, the type is one candle tiles (Q8_0, Q4_K, Q6_K), the
/// inner dimension a whole number of 256-value blocks and the outer one of 16-row tiles (candle 0.11's
/// `repack_x86::select`). Elsewhere candle runs one block dot product per (row, column) pair: the
/// 25M model's down projection (1,408 inputs, 5.5 blocks) took 34% of a Q8_0 prefill that way, and
/// the prefill ran at 0.49× llama.cpp.
fn int8_tiles(q: &candle_core::quantized::QTensor) -> bool {
    let (n, k) = match q.shape().dims() {
        [n, k] => (*n, *k),
        _ => return false,
    };
    int8_dot_products()
        && matches!(q.dtype(), GgmlDType::Q8_0 | GgmlDType::Q4K | GgmlDType::Q6K)
        && k % 256 == 0
        && n % 16 == 0
}

/// Whether the CPU has VNNI (AVX-512 VNNI or AVX-VNNI), which candle's int8 tiles need.
fn int8_dot_products() -> bool {
    static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VNNI.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            (std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vnni"))
                || std::arch::is_x86_feature_detected!("avxvnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// A projection `y = x·Wᵀ + b`.
#[derive(Debug, Clone)]
pub enum Linear {
    /// Dense weights (safetensors, F32/F16 GGUF tensors).
    Dense(candle_nn::Linear),
    /// GGML-quantized weights (Q8_0, k-quants, ...): candle's quantized matmul on f32 activations.
    Quant {
        /// The quantized matrix.
        w: QMatMul,
        /// The bias, dense.
        bias: Option<Tensor>,
    },
}

impl Linear {
    /// A dense projection.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::Dense(candle_nn::Linear::new(weight, bias))
    }

    /// A projection from a GGML tensor: dense when it is stored as floats (F32, F16, BF16: the same
    /// matmul as safetensors, bit for bit in F32), else quantized.
    pub fn from_qtensor(q: QTensor, dtype: DType, device: &Device, bias: Option<Tensor>) -> CResult<Self> {
        if matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            return Ok(Self::dense(q.dequantize(device)?.to_dtype(dtype)?, bias));
        }
        Ok(Self::Quant {
            w: QMatMul::from_qtensor(q)?,
            bias,
        })
    }

    /// The weight matrix `(out, inp)` as dense f32 (dequantized when quantized).
    pub fn weight_f32(&self) -> CResult<Tensor> {
        match self {
            Self::Dense(l) => l.weight().to_dtype(DType::F32),
            Self::Quant { w, .. } => match w {
                QMatMul::QTensor(q) => q.dequantize(&q.device()),
                QMatMul::Tensor(t) => t.to_dtype(DType::F32),
                QMatMul::TensorF16(t) => t.to_dtype(DType::F32),
            },
        }
    }

    /// Several dense projections of the same input as one (their weights stacked by output row, and
    /// their biases when every one has one): one product instead of several at each step, each
    /// output row computed as before. `None` when any is quantized or they differ in dtype, device
    /// or bias.
    pub fn stacked(parts: &[&Linear]) -> CResult<Option<Self>> {
        let dense: Option<Vec<&candle_nn::Linear>> = parts
            .iter()
            .map(|l| match l {
                Self::Dense(d) => Some(d),
                Self::Quant { .. } => None,
            })
            .collect();
        let Some(dense) = dense else { return Ok(None) };
        let Some(first) = dense.first() else {
            return Ok(None);
        };
        let (dtype, device) = (first.weight().dtype(), first.weight().device());
        if dense
            .iter()
            .any(|d| d.weight().dtype() != dtype || !d.weight().device().same_device(device))
        {
            return Ok(None);
        }
        let weights: Vec<&Tensor> = dense.iter().map(|d| d.weight()).collect();
        let biases: Option<Vec<&Tensor>> = dense.iter().map(|d| d.bias()).collect();
        let bias = match biases {
            Some(b) => Some(Tensor::cat(&b, 0)?),
            None if dense.iter().all(|d| d.bias().is_none()) => None,
            None => return Ok(None),
        };
        Ok(Some(Self::dense(Tensor::cat(&weights, 0)?, bias)))
    }

    /// Whether the weights are GGML-quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(self, Self::Quant { .. })
    }

    /// The projection of `x` (`(..., inp)`).
    ///
    /// A one-row product of a large f32 matrix on the CPU (a decode step at batch 1) is split over
    /// the kernel threads ([`super::matvec`]).
    ///
    /// Dense products of up to [`super::matvec::MAX_ROWS`] rows (decode steps) go to
    /// [`super::matvec::few_rows`]: every kernel thread, each weight read once, a row's result the
    /// same alone or batched. More rows (prefill) run as `W·xᵀ` up to [`GEMM_ROWS`]: with the weight
    /// as the left operand, candle's CPU gemm does not repack it (measured: 149 against 301 µs for
    /// 16 × 512 → 1408 as `x·Wᵀ`); beyond, candle's own `x·Wᵀ`, which avoids two transposing copies.
    /// Other devices and dtypes keep candle's path.
    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let dims = x.dims().to_vec();
        let inner = dims.last().copied().unwrap_or(1).max(1);
        let rows = x.elem_count() / inner;
        let lin = match self {
            Self::Dense(l) => l,
            Self::Quant { w, bias } => {
                let dtype = x.dtype();
                if let QMatMul::QTensor(q) = w
                    && rows > super::matvec::MAX_ROWS
                    && x.device().is_cpu()
                    && !int8_tiles(q)
                {
                    // Prefill where candle has no int8 tiles for this weight (no VNNI, or a shape
                    // or type it does not tile): the weight dequantized for this call and candle's
                    // f32 gemm. There candle's quantized product costs ~2.5× the f32 gemm per row
                    // at Q8_0 (481 rows of a 25M model: 1,150–1,250 ms against 400–410 in f32;
                    // Q4_K_M 540, Q6_K 560) and dequantizing costs about ten of those rows (Q8_0
                    // 445 ms, Q4_K_M 420, Q6_K 375–490). Decode steps (up to `MAX_ROWS` rows)
                    // stay quantized.
                    let dense = Self::dense(q.dequantize(x.device())?, bias.clone());
                    return dense.forward(&x.to_dtype(DType::F32)?)?.to_dtype(dtype);
                }
                let y = w.forward(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
                return match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                };
            }
        };
        let w = lin.weight();
        let mut shape = dims;
        if let Some(last) = shape.last_mut() {
            *last = w.dim(0)?;
        }
        let cpu_f32 = w.device().is_cpu() && w.dtype() == DType::F32 && x.dtype() == DType::F32;
        if cpu_f32 && (1..=super::matvec::MAX_ROWS).contains(&rows) {
            let y = super::matvec::few_rows(w, &x.reshape((rows, inner))?)?.reshape(shape)?;
            return match lin.bias() {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            };
        }
        if rows <= 1 || rows > GEMM_ROWS || !w.device().is_cpu() {
            return lin.forward(x);
        }
        let x2 = x.reshape((rows, inner))?.t()?.contiguous()?;
        let y = w.matmul(&x2)?.t()?.contiguous()?.reshape(shape)?;
        match lin.bias() {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}
