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
//! A chosen expert the cache loads inside the step need not be copied by the host: with
//! [`super::fills`] collecting, a miss whose bytes lie in the registered shard mappings gets
//! its device buffer and no copy, and the answer lists the copies instead (source in mapped
//! host memory, destination, bytes). Every block of the gate's grid then copies them, reading
//! the page cache's pages over the link with the GPU's own loads, before the layer's experts
//! run: one launch for all of a layer's misses, no copy issued, waited for or woken from by the
//! host. The last block writes the copies' GPU time into the slot, which the host reads once
//! the step has run ([`Gates::filled_ns`]).
//!
//! A slot (`STRIDE` bytes) holds the posted number (byte 0), the answer (byte 64) with the
//! number of copies (byte 68; one 8-byte word, so one read of the link gives both), their GPU
//! time (byte 72), the gate's timestamps (byte 80: start, post, answer seen, end; see
//! [`Gates::times`]), the route words (byte 128: ids, weight bits,
//! then any lookahead prediction's ids and weights), the chosen experts' addresses (byte 384:
//! gate, up, down of each, router order) and the copies (byte 1536). The token's number lives
//! in device memory; the step's first gate advances it, and the host keeps the same count
//! ([`Gates::next_token`]). An answer with the top bit set (the host failed: it returns its own
//! error) or none within [`TIMEOUT_NS`] makes the gate trap, which stops the context: a step is
//! never run on addresses the host did not give.

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaSlice, CudaView, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use candle_core::CudaDevice;

use super::cuda::driver;
use super::fused::{kernels, Table, MAX_K};
use super::Fill;
use crate::error::{Error, Result};
use crate::weights::cuda::Packed;

/// Bytes of one MoE layer's slot.
const STRIDE: usize = 5120;
/// Word offsets inside a slot: the posted number, the answer (the number of copies in the
/// next word), their GPU time (two words), the timestamps (four 8-byte words), the route
/// words, the addresses, the copies.
const POSTED: usize = 0;
const READY: usize = 16;
const FILL_NS: usize = 18;
const STAMPS: usize = 20;
const WORDS: usize = 32;
const ADDRS: usize = 96;
const COPIES: usize = 384;
/// Copies one answer can list: every part of every chosen expert.
pub const MAX_FILLS: usize = 9 * MAX_K;
/// Device words of one layer's gate: the copies, then three control words (see `moe_gate`).
const SCRATCH: usize = 440;
/// Threads of one block of a gate.
const THREADS: u32 = 512;
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
    /// Each layer's device words (`SCRATCH` a layer).
    scratch: CudaSlice<u64>,
    /// Blocks of a gate's grid: one a multiprocessor, so all of them run at once (the others
    /// wait for block 0).
    blocks: u32,
    /// The number of the token whose step the host follows now.
    token: u32,
    /// The slots answered with copies in the current step.
    filled: Vec<usize>,
    /// Nanoseconds of the host's turns in the current step (from a post seen to its answer).
    host_ns: u64,
    /// When the host saw the post it is answering now.
    seen: Option<std::time::Instant>,
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
        let scratch = stream
            .alloc_zeros::<u64>(slots.max(1) * SCRATCH)
            .map_err(|e| driver("allocation", e))?;
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| driver("device attribute", e))?;
        Ok(Gates {
            _mem: mem,
            host: host.cast(),
            dev_addr,
            slots,
            seq,
            scratch,
            blocks: u32::try_from(sms).unwrap_or(1).clamp(1, 1024),
            token: 0,
            filled: Vec::new(),
            host_ns: 0,
            seen: None,
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
        let scratch = self.scratch.slice(slot * SCRATCH..(slot + 1) * SCRATCH);
        let mut b = stream.launch_builder(f.gate);
        b.arg(out)
            .arg(&words)
            .arg(&k_u)
            .arg(&mut self.seq)
            .arg(&bump)
            .arg(&at)
            .arg(launch)
            .arg(&TIMEOUT_NS)
            .arg(&scratch);
        let cfg = LaunchConfig {
            grid_dim: (self.blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: block 0's first warp reads `words` values of `out` (its length) and the
        // counter, writes words 0..ADDRS of its slot inside the mapped allocation (`slot` <
        // `slots`, checked), reads 9·k ≤ 144 addresses from byte 384 and at most MAX_FILLS
        // copies from byte 1536 (their end, 4992, < STRIDE), writes entries below k ≤ 16 of the
        // launch table and the layer's SCRATCH words. The copies' sources lie in registered
        // mappings the step keeps registered and their destinations in expert buffers it holds
        // until it has run (the host's answer; see `answer`). One block a multiprocessor: every
        // block is resident while the others wait for block 0.
        unsafe { b.launch(cfg) }.map_err(|e| driver("gate kernel", e))?;
        Ok(())
    }

    /// Starts following a newly launched step: the number its first gate will post.
    pub fn next_token(&mut self) -> u32 {
        self.token = (self.token + 1) & !ABORT;
        self.filled.clear();
        self.host_ns = 0;
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
        &mut self,
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
        self.seen = Some(std::time::Instant::now());
        // SAFETY: words WORDS.. WORDS + words of the slot, written before the posted number.
        Ok((0..words)
            .map(|i| unsafe { std::ptr::read_volatile(self.word(slot, WORDS + i)) })
            .collect())
    }

    /// Answers slot `slot`'s gate with the chosen experts' addresses (router order) and the
    /// copies the step is to make before they run (their sources and destinations must stay
    /// valid until the step has run).
    pub fn answer(&mut self, slot: usize, entries: &[[Packed; 3]], fills: &[Fill]) -> Result<()> {
        if slot >= self.slots || entries.len() > MAX_K || fills.len() > MAX_FILLS {
            return Err(Error::Input(format!(
                "internal: gate {slot} answer too long"
            )));
        }
        let copies = self.word(slot, COPIES) as *mut u64;
        for (i, f) in fills.iter().enumerate() {
            for (j, v) in [f.src, f.dst, f.len].into_iter().enumerate() {
                // SAFETY: 3·144 words of 8 bytes from byte 1536: inside the slot.
                unsafe { std::ptr::write_volatile(copies.add(3 * i + j), v) };
            }
        }
        // SAFETY: inside the slot; FILL_NS is 8-byte aligned (byte 72).
        unsafe { std::ptr::write_volatile(self.word(slot, FILL_NS) as *mut u64, 0) };
        if !fills.is_empty() {
            self.filled.push(slot);
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
        // The answer and the number of copies in one store (the gate reads them in one load).
        let ready = (fills.len() as u64) << 32 | u64::from(self.token);
        // SAFETY: inside the slot; READY is 8-byte aligned (byte 64).
        unsafe { std::ptr::write_volatile(self.word(slot, READY) as *mut u64, ready) };
        if let Some(t) = self.seen.take() {
            self.host_ns += t.elapsed().as_nanos() as u64;
        }
        Ok(())
    }

    /// Where the time of the step just run went, gate by gate (its timestamps; see
    /// [`crate::models::fallback::GateTimes`]), once it has run.
    pub fn times(&self) -> crate::models::fallback::GateTimes {
        let mut t = crate::models::fallback::GateTimes {
            gates: self.slots as u64,
            host_ns: self.host_ns,
            ..Default::default()
        };
        let mut end = None;
        for s in 0..self.slots {
            // SAFETY: four 8-byte words from byte 80 of the slot; the step has run, so the
            // device wrote them.
            let [t0, post, seen, done] = [0, 1, 2, 3].map(|i| unsafe {
                std::ptr::read_volatile((self.word(s, STAMPS) as *const u64).add(i))
            });
            t.post_ns += post.saturating_sub(t0);
            t.wait_ns += seen.saturating_sub(post);
            t.after_ns += done.saturating_sub(seen);
            if let Some(e) = end {
                t.between_ns += t0.saturating_sub(e);
            }
            end = Some(done);
        }
        t
    }

    /// The GPU nanoseconds the copies of the step just run took (summed over its gates), once
    /// it has run; forgets them.
    pub fn filled_ns(&mut self) -> u64 {
        let slots = std::mem::take(&mut self.filled);
        slots
            .into_iter()
            // SAFETY: inside the slot; the step has run, so the device wrote it.
            .map(|s| unsafe { std::ptr::read_volatile(self.word(s, FILL_NS) as *const u64) })
            .sum()
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
