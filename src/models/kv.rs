//! Per-layer caches of a sequence: keys and values (or MLA's latent and RoPE key) in buffers
//! allocated once for the sequence's length and written in place, and a linear-attention
//! layer's recurrent state.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// Keys and values of one layer (`[1, kv_heads, S, head_dim]`, or MLA's latent and RoPE key),
/// in buffers allocated once for the sequence's length (prompt + new tokens) and written in
/// place: the cache never holds more than the run's context, nor two copies while it grows.
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    kv: Option<Buffers>,
    capacity: usize,
    /// A DeltaNet layer's state instead of keys and values.
    pub(crate) delta: DeltaState,
}

/// The key and value buffers: the first `len` entries along `dim` are filled.
#[derive(Debug, Clone)]
struct Buffers {
    k: Tensor,
    v: Tensor,
    dim: usize,
    len: usize,
}

impl Buffers {
    /// Entries the buffers hold.
    fn capacity(&self) -> usize {
        self.k.dims()[self.dim]
    }
}

impl LayerKv {
    /// An empty cache for a sequence of up to `capacity` tokens (it grows in steps of
    /// `capacity` if a longer one comes).
    pub fn with_capacity(capacity: usize) -> Self {
        LayerKv {
            kv: None,
            capacity,
            delta: Default::default(),
        }
    }

    /// Room for `n` more entries along `dim` in buffers of entries shaped `k` and `v` (`n` along
    /// `dim`; allocated, or grown by whole steps, as needed): the whole key and value buffers
    /// and the position the `n` new entries go to. [`LayerKv::commit`] then counts them.
    pub fn reserve(
        &mut self,
        [k, v]: [&[usize]; 2],
        dtype: DType,
        dev: &Device,
        dim: usize,
        n: usize,
    ) -> Result<(Tensor, Tensor, usize)> {
        let step = self.capacity.max(n).max(1);
        let zeros = |like: &[usize], len: usize| -> Result<Tensor> {
            let mut shape = like.to_vec();
            shape[dim] = len;
            Ok(Tensor::zeros(shape, dtype, dev)?)
        };
        let b = match &mut self.kv {
            Some(b) => b,
            None => self.kv.insert(Buffers {
                k: zeros(k, step)?,
                v: zeros(v, step)?,
                dim,
                len: 0,
            }),
        };
        while b.len + n > b.capacity() {
            b.k = Tensor::cat(&[&b.k, &zeros(k, step)?], dim)?;
            b.v = Tensor::cat(&[&b.v, &zeros(v, step)?], dim)?;
        }
        Ok((b.k.clone(), b.v.clone(), b.len))
    }

    /// Counts `n` entries written after [`LayerKv::reserve`] and returns the filled part of the
    /// key and value buffers.
    pub fn commit(&mut self, n: usize) -> Result<(Tensor, Tensor)> {
        let Some(b) = &mut self.kv else {
            return Err(crate::error::Error::Input(
                "internal: cache entries committed before any were reserved".into(),
            ));
        };
        if b.len + n > b.capacity() {
            return Err(crate::error::Error::Input(format!(
                "internal: {n} cache entries committed after {} of {} were filled",
                b.len,
                b.capacity()
            )));
        }
        b.len += n;
        Ok((b.k.narrow(b.dim, 0, b.len)?, b.v.narrow(b.dim, 0, b.len)?))
    }

    /// Entries filled so far.
    pub fn len(&self) -> usize {
        self.kv.as_ref().map_or(0, |b| b.len)
    }

    /// Whether nothing is filled yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries the buffers hold without growing (0 before the first reserve).
    pub fn room(&self) -> usize {
        self.kv.as_ref().map_or(0, Buffers::capacity)
    }

    /// The identities of the key and value buffers (they change when the buffers are made or
    /// grown): what a captured CUDA graph of a decode step wrote through.
    pub fn buffer_ids(&self) -> Option<(candle_core::TensorId, candle_core::TensorId)> {
        self.kv.as_ref().map(|b| (b.k.id(), b.v.id()))
    }

    /// Counts `n` entries written in place by kernels that took their position from device
    /// memory (a replayed CUDA graph), as [`LayerKv::reserve`] then [`LayerKv::commit`] would,
    /// without growing the buffers.
    pub fn advance(&mut self, n: usize) -> Result<()> {
        match &mut self.kv {
            Some(b) if b.len + n <= b.capacity() => {
                b.len += n;
                Ok(())
            }
            _ => Err(crate::error::Error::Input(format!(
                "internal: {n} cache entries advanced past the buffers' {} of {}",
                self.len(),
                self.room()
            ))),
        }
    }

    /// Forgets the entries past the first `len` (host bookkeeping only: the buffers keep their
    /// bytes, to be overwritten).
    pub fn truncate(&mut self, len: usize) {
        if let Some(b) = &mut self.kv {
            b.len = b.len.min(len);
        }
    }

    /// Appends new entries along `dim` (the sequence axis) and returns the whole cache.
    pub fn append(&mut self, k: Tensor, v: Tensor, dim: usize) -> Result<(Tensor, Tensor)> {
        let n = k.dim(dim)?;
        let (kb, vb, pos) = self.reserve([k.dims(), v.dims()], k.dtype(), k.device(), dim, n)?;
        kb.slice_set(&k.contiguous()?, dim, pos)?;
        vb.slice_set(&v.contiguous()?, dim, pos)?;
        self.commit(n)
    }

    /// On the CPU: appends `t` entries given token by token (`k` and `v` `[t, heads, hd]`, the
    /// projections' rows) straight into f32 buffers `[1, heads, capacity, hd]` (no tensors of
    /// the new entries, no copies between layouts on the way) and returns the entries filled.
    /// The same values as [`LayerKv::append`] of the entries as `[1, heads, t, hd]` tensors.
    pub fn append_rows(
        &mut self,
        k: &[f32],
        v: &[f32],
        (heads, hd): (usize, usize),
    ) -> Result<usize> {
        let t = k.len() / (heads * hd).max(1);
        let shape = [1, heads, t, hd];
        let (kb, vb, pos) = self.reserve([&shape, &shape], DType::F32, &Device::Cpu, 2, t)?;
        kb.inplace_op1(&WriteRows {
            src: k,
            heads,
            hd,
            pos,
        })?;
        vb.inplace_op1(&WriteRows {
            src: v,
            heads,
            hd,
            pos,
        })?;
        self.commit(t)?;
        Ok(self.len())
    }

    /// On the CPU, `f(keys, values, capacity)` over the cache's f32 buffers, each
    /// `[kv heads, capacity, head dim]` (positions past the cached ones are unused); `None` when
    /// the cache is not such a buffer (another device or dtype, or nothing cached yet).
    pub fn with_host_buffers<R>(&self, f: impl FnOnce(&[f32], &[f32], usize) -> R) -> Option<R> {
        let b = self.kv.as_ref()?;
        let (k, v) = (&b.k, &b.v);
        let (_, _, cap, _) = k.dims4().ok()?;
        let ((ks, kl), (vs, vl)) = (k.storage_and_layout(), v.storage_and_layout());
        match (&*ks, &*vs) {
            (candle_core::Storage::Cpu(kc), candle_core::Storage::Cpu(vc))
                if kl.is_contiguous() && vl.is_contiguous() =>
            {
                let kb = &kc.as_slice::<f32>().ok()?[kl.start_offset()..];
                let vb = &vc.as_slice::<f32>().ok()?[vl.start_offset()..];
                Some(f(kb, vb, cap))
            }
            _ => None,
        }
    }

    /// Bytes of the buffers allocated so far.
    pub fn bytes(&self) -> u64 {
        let size = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        self.kv.as_ref().map_or(0, |b| size(&b.k) + size(&b.v)) + self.delta.bytes()
    }
}

/// New entries `src` (`[t, heads, hd]`) written into a `[1, heads, capacity, hd]` f32 buffer from
/// position `pos` ([`LayerKv::append_rows`]).
struct WriteRows<'a> {
    src: &'a [f32],
    heads: usize,
    hd: usize,
    pos: usize,
}

impl candle_core::InplaceOp1 for WriteRows<'_> {
    fn name(&self) -> &'static str {
        "kv-write-rows"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let (heads, hd) = (self.heads, self.hd);
        let t = self.src.len() / (heads * hd).max(1);
        let (candle_core::CpuStorage::F32(buf), Some((start, end)), &[1, h, cap, d]) =
            (storage, layout.contiguous_offsets(), layout.dims())
        else {
            return Err(candle_core::Error::Msg(
                "internal: a KV buffer that is not a contiguous f32 [1, heads, S, hd]".into(),
            ));
        };
        if (h, d) != (heads, hd) || self.pos + t > cap || end - start != h * cap * d {
            return Err(candle_core::Error::Msg(format!(
                "internal: {t} KV entries of [{heads}, {hd}] at {} into a [{h}, {cap}, {d}] buffer",
                self.pos
            )));
        }
        let buf = &mut buf[start..end];
        for g in 0..heads {
            for i in 0..t {
                let dst = (g * cap + self.pos + i) * hd;
                let src = (i * heads + g) * hd;
                buf[dst..dst + hd].copy_from_slice(&self.src[src..src + hd]);
            }
        }
        Ok(())
    }
}

/// A gated DeltaNet layer's state between calls ([`super::deltanet`]): the convolution's last inputs and the recurrent
/// matrices.
#[derive(Debug, Clone, Default)]
pub struct DeltaState {
    /// `[conv_dim, K − 1]`: the last `K − 1` convolution inputs per channel, oldest first.
    pub(crate) conv: Vec<f32>,
    /// `[num_v_heads, k_head_dim, v_head_dim]`.
    pub(crate) recurrent: Vec<f32>,
}

impl DeltaState {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        4 * (self.conv.len() + self.recurrent.len()) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_vec2().unwrap()
    }

    #[test]
    fn appends_grow_by_whole_steps_and_keep_every_entry() {
        let dev = Device::Cpu;
        let mut kv = LayerKv::with_capacity(2);
        let entry = |v: f32, n: usize| Tensor::full(v, (n, 3), &dev).unwrap();
        kv.append(entry(1.0, 1), entry(-1.0, 1), 0).unwrap();
        let (k, v) = kv.append(entry(2.0, 2), entry(-2.0, 2), 0).unwrap();
        assert_eq!(rows(&k), vec![vec![1.0; 3], vec![2.0; 3], vec![2.0; 3]]);
        assert_eq!(rows(&v)[2], vec![-2.0; 3]);
        // Two steps of two rows allocated for three entries: the fourth fits in place.
        assert_eq!(kv.bytes(), 2 * 4 * 3 * 4);
        let (kb, _, pos) = kv
            .reserve([&[1, 3], &[1, 3]], DType::F32, &dev, 0, 1)
            .unwrap();
        assert_eq!((kb.dim(0).unwrap(), pos), (4, 3));
        kb.slice_set(&entry(4.0, 1), 0, pos).unwrap();
        let (k, v) = kv.commit(1).unwrap();
        assert_eq!(rows(&k)[3], vec![4.0; 3]);
        assert_eq!(v.dim(0).unwrap(), 4);
    }

    /// Entries given token by token land where `append` puts the same entries as
    /// `[1, heads, t, hd]` tensors, across a growth of the buffers; a buffer of another shape is
    /// an error.
    #[test]
    fn rows_appended_in_place_equal_appended_tensors() {
        let dev = Device::Cpu;
        let (heads, hd) = (3, 4);
        let (mut a, mut b) = (LayerKv::with_capacity(4), LayerKv::with_capacity(4));
        let mut n = 0f32;
        for t in [3, 1, 2] {
            let mut vals = || -> Vec<f32> {
                (0..t * heads * hd)
                    .map(|_| {
                        n += 1.0;
                        n
                    })
                    .collect()
            };
            let (k, v) = (vals(), vals());
            // `[t, heads, hd]` → `[1, heads, t, hd]`.
            let by_head = |x: &[f32]| {
                Tensor::from_slice(x, (t, heads, hd), &dev)
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap()
            };
            a.append(by_head(&k), by_head(&v), 2).unwrap();
            assert_eq!(b.append_rows(&k, &v, (heads, hd)).unwrap(), a.len());
        }
        let all = |kv: &LayerKv| kv.with_host_buffers(|k, v, cap| (k.to_vec(), v.to_vec(), cap));
        assert_eq!(all(&a), all(&b));
        assert_eq!((b.len(), b.room()), (6, 8));
        let err = b.append_rows(&[0.0; 8], &[0.0; 8], (2, 4)).unwrap_err();
        assert!(err.to_string().contains("into a [3, 8, 4] buffer"), "{err}");
    }

    #[test]
    fn committing_more_than_was_reserved_is_an_error() {
        let mut kv = LayerKv::with_capacity(2);
        kv.reserve([&[1, 3], &[1, 3]], DType::F32, &Device::Cpu, 0, 1)
            .unwrap();
        let err = kv.commit(3).unwrap_err();
        assert!(err.to_string().contains("committed after 0 of 2"), "{err}");
    }

    #[test]
    fn advancing_counts_entries_in_place_and_never_grows() {
        let dev = Device::Cpu;
        let mut kv = LayerKv::with_capacity(3);
        assert_eq!((kv.len(), kv.room(), kv.buffer_ids()), (0, 0, None));
        // Nothing reserved yet: a replayed step has no buffers to count into.
        assert!(kv.advance(1).is_err());
        kv.append(
            Tensor::ones((1, 2), DType::F32, &dev).unwrap(),
            Tensor::ones((1, 2), DType::F32, &dev).unwrap(),
            0,
        )
        .unwrap();
        let ids = kv.buffer_ids();
        kv.advance(2).unwrap();
        assert_eq!((kv.len(), kv.room()), (3, 3));
        // Past the buffers: an error, not a grown buffer (a captured step wrote through these).
        let err = kv.advance(1).unwrap_err();
        assert!(
            err.to_string().contains("past the buffers' 3 of 3"),
            "{err}"
        );
        assert_eq!(kv.buffer_ids(), ids);
        kv.truncate(1);
        assert_eq!(kv.len(), 1);
        kv.truncate(5);
        assert_eq!(kv.len(), 1);
        // Growing makes new buffers: a new identity.
        kv.reserve([&[1, 2], &[1, 2]], DType::F32, &dev, 0, 3)
            .unwrap();
        assert_ne!(kv.buffer_ids(), ids);
    }

    #[test]
    fn a_reused_cache_keeps_its_buffers_only_where_they_fit() {
        let dev = Device::Cpu;
        let ones = || Tensor::ones((1, 2), DType::F32, &dev).unwrap();
        // Two layers whose buffers hold `room` entries, one of them filled.
        let filled = |room: usize| {
            let mut l = LayerKv::with_capacity(room);
            l.append(ones(), ones(), 0).unwrap();
            let mut kv = super::super::KvCache::with_capacity(room);
            kv.layers = vec![l.clone(), LayerKv::with_capacity(room)];
            kv.layers[1].append(ones(), ones(), 0).unwrap();
            kv.len = 1;
            kv
        };
        let kv = filled(8);
        let ids: Vec<_> = kv.layers.iter().map(LayerKv::buffer_ids).collect();
        let kv = kv.reuse(6);
        assert_eq!((kv.len, kv.capacity), (0, 6));
        assert_eq!(
            kv.layers
                .iter()
                .map(LayerKv::buffer_ids)
                .collect::<Vec<_>>(),
            ids
        );
        assert!(kv.layers.iter().all(|l| (l.len(), l.room()) == (0, 8)));
        // Buffers too small, or more than twice the new sequence, or none yet: a new cache.
        for (room, tokens) in [(8, 9), (8, 3)] {
            let kv = filled(room).reuse(tokens);
            assert!(kv.layers.is_empty() && kv.capacity == tokens);
        }
        assert!(super::super::KvCache::with_capacity(4)
            .reuse(4)
            .layers
            .is_empty());
    }

    #[test]
    fn commit_before_reserve_is_an_error() {
        let err = LayerKv::with_capacity(4).commit(1).unwrap_err();
        assert!(
            err.to_string().contains("before any were reserved"),
            "{err}"
        );
    }
}
