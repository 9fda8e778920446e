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

impl KvShape {
    /// The capacity of new storage for `need` positions that leaves room to grow: the next power of
    /// two (at least [`MIN_KV_CAPACITY`]), at most the model's positions unless `need` is more.
    fn room_for(&self, need: usize) -> usize {
        need.next_power_of_two()
            .max(MIN_KV_CAPACITY)
            .min(self.max_positions.max(need))
    }
}

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
        let cap = if same_batch { shape.room_for(need) } else { need };
        self.copied_into(b, cap, need, shape, device)
    }

    /// This cache with room for `positions` in all, so that appending up to there writes in place:
    /// its own storage when that has the room and this view may write at its end, else a copy of
    /// its `len` positions into storage of the next power of two (at most the model's positions). A
    /// decode that knows its length takes its room once instead of growing two or three times on
    /// the way, every running sequence at the same step when they started together.
    pub(super) fn with_room(&self, positions: usize, shape: &KvShape, device: &Device) -> CResult<KvCache> {
        let positions = positions.min(shape.max_positions).max(self.len);
        let writable = self.written.load(Ordering::Acquire) == self.len;
        if self.layers.is_empty() || self.batch() != 1 || (writable && self.capacity() >= positions) {
            return Ok(self.clone());
        }
        self.copied_into(1, shape.room_for(positions), self.len, shape, device)
    }

    /// New storage of batch `b` and `cap` positions holding a copy of this cache's `len` positions,
    /// `written` positions claimed.
    fn copied_into(
        &self,
        b: usize,
        cap: usize,
        written: usize,
        shape: &KvShape,
        device: &Device,
    ) -> CResult<KvCache> {
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
            written: Arc::new(AtomicUsize::new(written)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> KvShape {
        KvShape {
            layers: 2,
            kv_heads: 2,
            head_dim: 4,
            max_positions: 256,
            dtype: DType::F32,
        }
    }

    /// `kv` appended to one position at a time up to `end` positions, as a decode does: the cache
    /// at the end and how many storages it went through.
    fn decode_to(mut kv: KvCache, end: usize) -> CResult<(KvCache, usize)> {
        let mut ids = vec![kv.storage_id()];
        while kv.len < end {
            kv = kv.for_append(1, 1, &shape(), &Device::Cpu)?;
            kv.len += 1;
            if ids.last() != Some(&kv.storage_id()) {
                ids.push(kv.storage_id());
            }
        }
        Ok((kv, ids.len()))
    }

    /// A 17-position prompt: storage with those positions written (position p holds p everywhere).
    fn prompt() -> CResult<KvCache> {
        let mut kv = KvCache::default().for_append(1, 17, &shape(), &Device::Cpu)?;
        let rows = Tensor::arange(0f32, 17.0, &Device::Cpu)?
            .reshape((1, 1, 17, 1))?
            .broadcast_as((1, 2, 17, 4))?
            .contiguous()?;
        for (k, v) in &kv.layers {
            k.slice_set(&rows, 2, 0)?;
            v.slice_set(&rows, 2, 0)?;
        }
        kv.len = 17;
        Ok(kv)
    }

    #[test]
    fn a_decode_that_took_its_room_never_copies_its_cache() -> CResult<()> {
        // Growing as it goes: the prompt's 32 positions, then 64, then 128, the held ones copied
        // each time.
        let (_, storages) = decode_to(prompt()?, 117)?;
        assert_eq!(storages, 3);
        // With its room taken at the start (one copy: the prompt's storage has 32): one storage.
        let roomy = prompt()?.with_room(118, &shape(), &Device::Cpu)?;
        assert_eq!(roomy.capacity(), 128);
        let (done, storages) = decode_to(roomy, 117)?;
        assert_eq!((storages, done.capacity(), done.len), (1, 128, 117));
        let first = done.layers[1]
            .1
            .narrow(2, 0, 17)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let expected: Vec<f32> = (0..2).flat_map(|_| (0..17).flat_map(|p| [p as f32; 4])).collect();
        assert_eq!(first, expected, "the prompt's positions survive the copy");
        // Room it already has: the same storage, no copy.
        let again = done.truncate(117)?.with_room(120, &shape(), &Device::Cpu)?;
        assert_eq!(again.storage_id(), done.storage_id());
        // A view another view wrote past cannot write in place: it gets storage of its own.
        let fork = done.truncate(50)?.with_room(60, &shape(), &Device::Cpu)?;
        assert_ne!(fork.storage_id(), done.storage_id());
        assert_eq!((fork.len, fork.capacity()), (50, 64));
        // Never past the model's positions.
        assert_eq!(prompt()?.with_room(1000, &shape(), &Device::Cpu)?.capacity(), 256);
        Ok(())
    }
}
