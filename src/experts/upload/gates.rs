//! The host's turn inside a captured decode step whose experts may miss (CUDA).
//!
//! A lazy cell's decode step cannot be one graph launch the way an all-resident one is
//! ([`super::routed`]): before a MoE layer's experts run, the host must learn the layer's
//! routes, report the step to the cache (which may load misses and evict) and hand the kernels
//! the chosen experts' addresses. Launched op by op, that costs a wait for the device and
//! about fifteen launches a MoE layer. Here the step stays one graph: after each MoE layer's
//! router, `moe_gate` (one warp) copies the layer's route words into the layer's slot of
//! mapped (zero-copy) pinned host memory, posts the token's number there, and spins until the
//! host answers that number with the chosen experts' addresses, which it copies into the fused
//! launch's table. The host, meanwhile, follows the step layer by layer
//! ([`Gates::wait`] → the cache's step → [`Gates::answer`]): a layer that only hits costs two
//! crossings of the link (the posted number, the answer), a miss its load besides.
//!
//! A slot (`STRIDE` bytes) holds the posted number (byte 0), the answer (byte 64), the route
//! words (byte 128: ids, weight bits, then any lookahead prediction's ids and weights) and the
//! chosen experts' addresses (byte 384: gate, up, down of each, router order). The token's
//! number lives in device memory; the step's first gate advances it, and the host keeps the
//! same count ([`Gates::next_token`]). An answer with the top bit set (the host failed: it
//! returns its own error) or none within [`TIMEOUT_NS`] makes the gate trap, which stops the
//! context: a step is never run on addresses the host did not give.

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaSlice, CudaView, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use candle_core::CudaDevice;

use super::cuda::driver;
use super::fused::{kernels, Table, MAX_K};
use crate::error::{Error, Result};
use crate::weights::cuda::Packed;

/// Bytes of one MoE layer's slot.
const STRIDE: usize = 1536;
/// Word offsets inside a slot: the posted number, the answer, the route words, the addresses.
const POSTED: usize = 0;
const READY: usize = 16;
const WORDS: usize = 32;
const ADDRS: usize = 96;
/// The answer's mark of a step the host gave up on.
const ABORT: u32 = 0x8000_0000;
/// How long a gate waits for the host before it stops the context (a host that died or hung).
pub const TIMEOUT_NS: u64 = 60_000_000_000;

/// The gates of one model's MoE layers: their slots in mapped host memory and the device's
/// token counter.
pub struct Gates {
    _mem: PinnedHostSlice<u8>,
    /// The slots, as the host sees them and as the device does.
    host: *mut u32,
    dev_addr: u64,
    slots: usize,
    seq: CudaSlice<u32>,
    /// The number of the token whose step the host follows now.
    token: u32,
}

// SAFETY: `host` points into `_mem`, which the struct owns; the slots are only touched through
// `&self`/`&mut self` (the device writes its own words, the host reads them with volatile loads).
unsafe impl Send for Gates {}

impl std::fmt::Debug for Gates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gates")
            .field("slots", &self.slots)
            .field("token", &self.token)
            .finish()
    }
}

impl Gates {
    /// Slots for `slots` MoE layers on `dev`.
    pub fn new(dev: &CudaDevice, slots: usize) -> Result<Self> {
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        let bytes = (slots * STRIDE).max(STRIDE);
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: every word is zeroed below before the device or the host reads it.
        let mut mem = unsafe { ctx.alloc_pinned_with_flags::<u8>(bytes, flags) }
            .map_err(|e| driver("mapped host allocation for the MoE gates", e))?;
        let host = mem
            .as_mut_ptr()
            .map_err(|e| driver("mapped host memory", e))?;
        // SAFETY: `bytes` bytes at `host`, just allocated.
        unsafe { std::ptr::write_bytes(host, 0, bytes) };
        let mut dev_addr: sys::CUdeviceptr = 0;
        // SAFETY: `host` is a mapped pinned allocation of this (current) context.
        let rc = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev_addr, host.cast(), 0) };
        if rc != sys::CUresult::CUDA_SUCCESS {
            return Err(Error::Input(format!(
                "CUDA: no device address for the MoE gates' mapped host memory ({rc:?})"
            )));
        }
        let seq = stream
            .alloc_zeros::<u32>(1)
            .map_err(|e| driver("allocation", e))?;
        Ok(Gates {
            _mem: mem,
            host: host.cast(),
            dev_addr,
            slots,
            seq,
            token: 0,
        })
    }

    /// MoE layers served.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Queues slot `slot`'s gate on the compute stream: publishes the `words` route words at
    /// the start of `out` and fills entries 0..`k` of `launch` from the host's answer (the
    /// weights from `out[k..2k]`). The step's first gate (`slot` 0) advances the token number.
    pub(super) fn launch(
        &mut self,
        dev: &CudaDevice,
        slot: usize,
        out: &CudaView<'_, u32>,
        k: usize,
        launch: &mut CudaSlice<Table>,
    ) -> Result<()> {
        let words = out.len();
        if slot >= self.slots || k > MAX_K || words > 4 * MAX_K || words < 2 * k {
            return Err(Error::Input(format!(
                "internal: gate {slot} of {} with {words} route words for top-{k}",
                self.slots
            )));
        }
        let f = kernels(dev).ok_or_else(|| {
            Error::Input("internal: the gate kernel is unavailable after it compiled".into())
        })?;
        let stream = dev.cuda_stream();
        let (words, k_u, bump) = (words as u32, k as u32, u32::from(slot == 0));
        let at = self.dev_addr + (slot * STRIDE) as u64;
        let mut b = stream.launch_builder(f.gate);
        b.arg(out)
            .arg(&words)
            .arg(&k_u)
            .arg(&mut self.seq)
            .arg(&bump)
            .arg(&at)
            .arg(launch)
            .arg(&TIMEOUT_NS);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: one warp reads `words` values of `out` (its length) and the counter, writes
        // words 0..ADDRS of its slot inside the mapped allocation (`slot` < `slots`, checked)
        // and reads 9·k ≤ 144 addresses from byte 384 (< STRIDE); writes entries below k ≤ 16
        // of the launch table.
        unsafe { b.launch(cfg) }.map_err(|e| driver("gate kernel", e))?;
        Ok(())
    }

    /// Starts following a newly launched step: the number its first gate will post.
    pub fn next_token(&mut self) -> u32 {
        self.token = (self.token + 1) & !ABORT;
        self.token
    }

    fn word(&self, slot: usize, i: usize) -> *mut u32 {
        // SAFETY (for the callers): inside the allocation for `slot < slots`, `i < STRIDE / 4`.
        debug_assert!(slot < self.slots && i < STRIDE / 4);
        unsafe { self.host.add(slot * STRIDE / 4 + i) }
    }

    /// Waits until slot `slot`'s gate posts the current token and returns its `words` route
    /// words. `alive` is asked now and then while waiting: an error (the step failed on the
    /// device) ends the wait.
    pub fn wait(
        &self,
        slot: usize,
        words: usize,
        mut alive: impl FnMut() -> Result<()>,
    ) -> Result<Vec<u32>> {
        if slot >= self.slots || words > 4 * MAX_K {
            return Err(Error::Input(format!(
                "internal: gate {slot} read past its slot"
            )));
        }
        let start = std::time::Instant::now();
        let mut spins = 0u32;
        // SAFETY: inside the slot (checked above); the device writes the word through the link.
        while unsafe { std::ptr::read_volatile(self.word(slot, POSTED)) } != self.token {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(4096) {
                alive()?;
                if start.elapsed().as_nanos() as u64 > TIMEOUT_NS {
                    return Err(Error::Input(format!(
                        "CUDA: the decode step did not reach MoE gate {slot} within {} s",
                        TIMEOUT_NS / 1_000_000_000
                    )));
                }
            }
            std::hint::spin_loop();
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        // SAFETY: words WORDS.. WORDS + words of the slot, written before the posted number.
        Ok((0..words)
            .map(|i| unsafe { std::ptr::read_volatile(self.word(slot, WORDS + i)) })
            .collect())
    }

    /// Answers slot `slot`'s gate with the chosen experts' addresses (router order).
    pub fn answer(&mut self, slot: usize, entries: &[[Packed; 3]]) -> Result<()> {
        if slot >= self.slots || entries.len() > MAX_K {
            return Err(Error::Input(format!(
                "internal: gate {slot} answer too long"
            )));
        }
        let at = self.word(slot, ADDRS) as *mut u64;
        for (i, e) in entries.iter().enumerate() {
            for (j, m) in e.iter().enumerate() {
                for (f, v) in [m.q, m.s, m.b].into_iter().enumerate() {
                    // SAFETY: 9·16 = 144 words of 8 bytes from byte 384: inside the slot.
                    unsafe { std::ptr::write_volatile(at.add(9 * i + 3 * j + f), v) };
                }
            }
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        // SAFETY: inside the slot.
        unsafe { std::ptr::write_volatile(self.word(slot, READY), self.token) };
        Ok(())
    }

    /// Gives up on the current step from slot `slot` on: each of those gates traps when
    /// reached (the caller returns why).
    pub fn abort_from(&mut self, slot: usize) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        for s in slot..self.slots {
            // SAFETY: inside slot `s` < `slots`.
            unsafe { std::ptr::write_volatile(self.word(s, READY), self.token | ABORT) };
        }
    }
}
