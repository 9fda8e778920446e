//! The KV cache: per-layer key/value storage held outside the model, so that the engine keeps one
//! per session, forks it for hypotheses, truncates it to a common prefix and appends in place.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};

type CResult<T> = candle_core::Result<T>;

/// Keys and values of every layer for a prefix of tokens.
///
/// Storage is preallocated per layer as `(batch, kv_heads, capacity, head_dim)`, and a cache is a view
/// of its first `len` positions. Appending writes in place when this view is the furthest any view of
/// that storage has been written (`written == len`) and there is room; otherwise (a fork or truncated
/// view that others extended, a full buffer, another batch size) the held positions are copied once
/// into new storage with room to grow (capacity doubling). Positions below a view's length are never
/// rewritten, so views stay immutable: a cache can be forked, truncated and shared freely, and a decode
/// step appends in O(1) amortised instead of copying the whole cache.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub(super) layers: Vec<(Tensor, Tensor)>,
    pub(super) len: usize,
    written: Arc<AtomicUsize>,
}

/// The shape of a model's KV storage.
#[derive(Debug, Clone, Copy)]
pub(super) struct KvShape {
    pub(super) layers: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
    pub(super) max_positions: usize,
    pub(super) dtype: DType,
}

/// Smallest capacity a growing cache gets.
const MIN_KV_CAPACITY: usize = 32;

impl KvCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the cache holds no position.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the storage can hold before it must grow (0 when none is allocated).
    pub fn capacity(&self) -> usize {
        self.layers.first().and_then(|(k, _)| k.dim(2).ok()).unwrap_or(0)
    }

    fn batch(&self) -> usize {
        self.layers.first().and_then(|(k, _)| k.dim(0).ok()).unwrap_or(1)
    }

    /// The first `n` positions (a view; no copy).
    pub fn truncate(&self, n: usize) -> CResult<KvCache> {
        if n == 0 {
            return Ok(KvCache::default());
        }
        let mut view = self.clone();
        view.len = n.min(self.len);
        Ok(view)
    }

    /// Bytes of key/value storage this cache's buffers hold (capacity included).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }

    /// Identifies the storage (views of one storage share it), for counting bytes once.
    pub fn storage_id(&self) -> usize {
        Arc::as_ptr(&self.written) as usize
    }

    /// This cache with storage that takes `s` more positions of batch `b` in place, those positions
    /// claimed: the same storage when possible, else new storage holding a copy of the `len` positions.
    pub(super) fn for_append(
        &self,
        b: usize,
        s: usize,
        shape: &KvShape,
        device: &Device,
    ) -> CResult<KvCache> {
        let need = self.len + s;
        let same_batch = self.layers.is_empty() || self.batch() == b;
        if !self.layers.is_empty()
            && same_batch
            && need <= self.capacity()
            && self
                .written
                .compare_exchange(self.len, need, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return Ok(self.clone());
        }
        // A batch that differs from the stored one (candidates over a shared context) is not extended
        // further: exact capacity. Otherwise room to grow.
        let cap = if same_batch {
            need.next_power_of_two()
                .max(MIN_KV_CAPACITY)
                .min(shape.max_positions.max(need))
        } else {
            need
        };
        let dims = (b, shape.kv_heads, cap, shape.head_dim);
        let mut layers = Vec::with_capacity(shape.layers);
        for i in 0..shape.layers {
            let k = Tensor::zeros(dims, shape.dtype, device)?;
            let v = Tensor::zeros(dims, shape.dtype, device)?;
            if self.len > 0
                && let Some((pk, pv)) = self.layers.get(i)
            {
                let held = (b, shape.kv_heads, self.len, shape.head_dim);
                let pk = pk.narrow(2, 0, self.len)?.broadcast_as(held)?.contiguous()?;
                let pv = pv.narrow(2, 0, self.len)?.broadcast_as(held)?.contiguous()?;
                k.slice_set(&pk, 2, 0)?;
                v.slice_set(&pv, 2, 0)?;
            }
            layers.push((k, v));
        }
        Ok(KvCache {
            layers,
            len: self.len,
            written: Arc::new(AtomicUsize::new(need)),
        })
    }
}
