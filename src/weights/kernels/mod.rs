//! CPU compute settings and how products are split across cores.
//!
//! An [`Engine`](crate::engine::Engine) runs each forward call in its [`Context`]: the kernel
//! kind of the packed products ([`Kernels`]) and a [`spin::SpinPool`] of the run's thread count
//! over which large products are split in row blocks. The call itself runs on a one-thread rayon
//! pool, so candle's own parallel CPU ops (softmax, small matmuls) run inline instead of waking
//! rayon's global workers for microseconds of work. Code outside an engine (unit tests,
//! benchmarks) runs exact kernels on one thread. Every row is computed by one thread with the
//! same operations whatever the thread count, so outputs are bit-identical for any `threads`
//! (tested).

pub mod q4;
pub mod spin;

use std::cell::RefCell;
use std::sync::Arc;

use spin::SpinPool;

named_enum! {
    /// Which arithmetic the CPU's packed (MLX 4-bit) products use.
    pub enum Kernels {
        /// f32 activations: the reference path (matches HF transformers to float rounding).
        #[default]
        Exact = "exact",
        /// Activations as two int8 parts per block of 32 (the value and its residual, ≈ 16-bit
        /// precision), integer dot products: within the 4-bit tolerance of HF (measured per
        /// fixture in the tests).
        Int8x2 = "int8x2",
        /// Activations as one int8 part per block of 32 (llama.cpp's Q8 scheme), integer dot
        /// products: fastest; its deviation from HF is larger than the 4-bit tolerance on our
        /// fixtures (measured in the tests), so it is for speed studies only.
        Int8 = "int8",
    }
}

/// What the products of one forward call run with.
#[derive(Clone)]
pub struct Context {
    /// Kernel kind of the packed products.
    pub kernels: Kernels,
    /// The threads row blocks are split over.
    pub spin: Arc<SpinPool>,
    /// A one-thread rayon pool the call runs in (see the module docs).
    rayon: Arc<rayon::ThreadPool>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("kernels", &self.kernels)
            .field("threads", &self.threads())
            .finish()
    }
}

impl Context {
    /// A context with `threads` compute threads (`None`: every core).
    pub fn new(kernels: Kernels, threads: Option<usize>) -> crate::error::Result<Self> {
        if threads == Some(0) {
            return Err(crate::error::Error::Input(
                "threads 0: at least one compute thread (leave it out for every core)".into(),
            ));
        }
        let n = threads.unwrap_or_else(cores);
        let err = |e: &dyn std::fmt::Display| {
            crate::error::Error::Input(format!("cannot start {n} compute threads: {e}"))
        };
        let spin = SpinPool::new(n).map_err(|e| err(&e))?;
        let rayon = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(|_| "compute-0".into())
            .build()
            .map_err(|e| err(&e))?;
        Ok(Context {
            kernels,
            spin: Arc::new(spin),
            rayon: Arc::new(rayon),
        })
    }

    /// Compute threads.
    pub fn threads(&self) -> usize {
        self.spin.threads()
    }
}

/// Cores of this machine.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

thread_local! {
    static CURRENT: RefCell<Option<(Kernels, Arc<SpinPool>)>> = const { RefCell::new(None) };
}

/// Runs `f` with `ctx`'s kernels and threads (on its compute thread; the caller waits).
pub fn with<R: Send>(ctx: &Context, f: impl FnOnce() -> R + Send) -> R {
    let cur = (ctx.kernels, ctx.spin.clone());
    ctx.rayon.install(move || {
        let prev = CURRENT.with(|c| c.borrow_mut().replace(cur));
        let out = f();
        CURRENT.with(|c| *c.borrow_mut() = prev);
        out
    })
}

/// The kernel kind in effect on this thread (exact outside [`with`]).
pub fn current_kernels() -> Kernels {
    CURRENT.with(|c| c.borrow().as_ref().map_or(Kernels::Exact, |c| c.0))
}

/// The pool of this thread's context, if it has more than one thread.
fn current_pool() -> Option<Arc<SpinPool>> {
    CURRENT.with(|c| {
        c.borrow()
            .as_ref()
            .filter(|c| c.1.threads() > 1)
            .map(|c| c.1.clone())
    })
}

/// Whether this thread's context splits work across more than one thread.
pub fn parallel() -> bool {
    current_pool().is_some()
}

/// Whether [`by_blocks`] splits `work` over this thread's context: a pool
/// of several threads, not inside one of its blocks, and at least [`PARALLEL_WORK`].
pub fn splits(work: usize) -> bool {
    work >= PARALLEL_WORK && current_pool().is_some_and(|p| !p.in_job())
}

/// Threads of this thread's context (1 outside [`with`] or inside a parallel job's block).
pub fn current_threads() -> usize {
    current_pool().map_or(1, |p| if p.in_job() { 1 } else { p.threads() })
}

/// `f(i)` for every `i < n`, each once, on the context's threads (serially without a context
/// of several threads, or when called from inside another parallel job). The caller combines
/// the results in index order, so the outcome does not depend on the thread count.
pub fn par_for(n: usize, f: &(dyn Fn(usize) + Sync)) {
    let Some(cur) = CURRENT.with(|c| c.borrow().clone()) else {
        return (0..n).for_each(f);
    };
    if cur.1.threads() <= 1 {
        return (0..n).for_each(f);
    }
    // The pool's threads run `f` in this thread's context (its kernel kind above all: work
    // done on a worker must not silently fall back to the exact kernels).
    let pool = cur.1.clone();
    pool.run(n, &|i| {
        let prev = CURRENT.with(|c| c.borrow_mut().replace(cur.clone()));
        f(i);
        CURRENT.with(|c| *c.borrow_mut() = prev);
    });
}

/// `f(i)` for `i` in `0..n` as [`par_for`] runs them, each value in its place; an internal
/// error if an index did not run ([`par_for`] runs each once: not expected).
pub fn par_map<T: Send>(n: usize, f: &(dyn Fn(usize) -> T + Sync)) -> crate::error::Result<Vec<T>> {
    let slots: Vec<std::sync::Mutex<Option<T>>> = (0..n).map(|_| Default::default()).collect();
    par_for(n, &|i| {
        let y = f(i);
        *slots[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(y);
    });
    slots
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            s.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .ok_or_else(|| {
                    crate::error::Error::Input(format!(
                        "internal: index {i} of {n} of a parallel map did not run"
                    ))
                })
        })
        .collect()
}

/// A pointer to disjoint blocks of one buffer, handed to the pool's threads.
#[derive(Clone, Copy)]
struct Blocks<T>(*mut T);
// SAFETY: every user writes only the block it claimed; blocks do not overlap.
unsafe impl<T: Send> Send for Blocks<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for Blocks<T> {}

impl<T> Blocks<T> {
    /// Elements `start..start + len`.
    ///
    /// # Safety
    /// In bounds, and no other live reference to them.
    #[allow(clippy::mut_from_ref)]
    unsafe fn part(&self, start: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }

    /// Copies `src` to elements `start..start + src.len()` (which may not be initialised yet:
    /// no reference to them is made).
    ///
    /// # Safety
    /// In bounds of the allocation, and no other thread reads or writes them meanwhile.
    unsafe fn write(&self, start: usize, src: &[T])
    where
        T: Copy,
    {
        std::ptr::copy_nonoverlapping(src.as_ptr(), self.0.add(start), src.len());
    }
}

/// `rows` rows of `h` values, row `r` a copy of `src(r)` (`h` long), copied side by side on the
/// context's threads when they are many enough to split: a prompt's expert inputs gathered from
/// its tokens' rows (on the engine thread alone, that copy was serial work of every MoE layer).
/// Nothing is zeroed first: every value is written once.
pub fn gather_rows<'a>(rows: usize, h: usize, src: impl Fn(usize) -> &'a [f32] + Sync) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::with_capacity(rows * h);
    let buf = Blocks(out.as_mut_ptr());
    let copy = |r: usize| {
        let s = src(r);
        assert_eq!(s.len(), h, "a gathered row has h values");
        // SAFETY: row `r` of the allocation, written by this call alone.
        unsafe { buf.write(r * h, s) };
    };
    match current_pool() {
        Some(pool) if splits(rows * h) && rows > 1 => {
            let per = rows.div_ceil(2 * pool.threads());
            pool.run(rows.div_ceil(per), &|b| {
                (b * per..((b + 1) * per).min(rows)).for_each(copy);
            });
        }
        _ => (0..rows).for_each(copy),
    }
    // SAFETY: every row was written above (a panic in a row's copy leaves the length 0).
    unsafe { out.set_len(rows * h) };
    out
}

/// Products of at least this many weights are split across threads (≈ 10 µs of work with the
/// int8 kernels, against ≈ 1–2 µs to hand a block to another thread).
const PARALLEL_WORK: usize = 1 << 16;

/// Runs `row(r, out)` for every output row `r`, where `out` holds that row's `t` outputs (one
/// per input), and returns the outputs as `[t, rows]`. Products of `work` weights or more are
/// split into row blocks over the context's threads.
pub fn by_rows(
    rows: usize,
    t: usize,
    work: usize,
    row: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    by_row_runs(rows, t, work, 1, |r0, _, out| row(r0, out))
}

/// As [`by_rows`] with rows handed out in runs of up to `run` consecutive rows: `f(r0, n, out)`
/// computes rows `r0..r0 + n` (`n ≤ run`), `out` holding their `n × t` outputs row by row (row
/// `k`'s output for input `i` at `k·t + i`). Runs start at the first row of each thread's block
/// (a block's last run may be shorter); `f` must compute a row the same way in any run, so the
/// outputs do not depend on the thread count.
pub fn by_row_runs(
    rows: usize,
    t: usize,
    work: usize,
    run: usize,
    f: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let t1 = t.max(1);
    let run = run.max(1);
    let mut out = vec![0f32; rows * t1];
    // Rows r0..r1, whose outputs are `block` (`[r1 − r0, t]`), run by run.
    let runs = |r0: usize, r1: usize, block: &mut [f32]| {
        for (k, o) in block.chunks_mut(run * t1).enumerate() {
            let a = r0 + k * run;
            f(a, run.min(r1 - a), o);
        }
    };
    // Rows r0..r1 into `out` (`[t, rows]`): with one input the block is its part of `out`;
    // with several, each input's outputs go from the block to their row of `out` where the
    // block ran (on the block's thread, not after the region on the caller's: a prompt's
    // products left that transpose to the engine thread, a serial stretch of each product).
    let rows_into = |r0: usize, r1: usize, out: &Blocks<f32>| {
        if t1 == 1 {
            // SAFETY: rows r0..r1 of `out`, this block's alone.
            runs(r0, r1, unsafe { out.part(r0, r1 - r0) });
            return;
        }
        let mut block = vec![0f32; (r1 - r0) * t1];
        runs(r0, r1, &mut block);
        for k in 0..t1 {
            // SAFETY: input k's outputs of rows r0..r1: this block's alone, one at a time.
            let dst = unsafe { out.part(k * rows + r0, r1 - r0) };
            for (j, d) in dst.iter_mut().enumerate() {
                *d = block[j * t1 + k];
            }
        }
    };
    let buf = Blocks(out.as_mut_ptr());
    match current_pool() {
        Some(pool) if work >= PARALLEL_WORK && rows >= 16 => {
            // A few blocks per thread for balance, each a multiple of 16 rows (whole pairs of
            // tiles of a tiled matrix, `q4::tile`: the 512-bit kernels take two at once).
            let per = rows.div_ceil(4 * pool.threads()).next_multiple_of(16);
            pool.run(rows.div_ceil(per), &|b| {
                rows_into(b * per, ((b + 1) * per).min(rows), &buf);
            });
        }
        _ => rows_into(0, rows, &buf),
    }
    out
}

/// Row blocks of several products side by side on the context's threads, in one parallel
/// region: product `i` has `rows[i]` rows cut in blocks of `per[i]` and `inputs[i]` input rows,
/// `f(i, block)` returns a block's outputs `[inputs[i], block.len()]`, and each product comes
/// back as `[inputs[i], rows[i]]`, each block's outputs copied into place by the thread that
/// computed them (on the engine thread after the region, that copy was serial work of every
/// product). A block's rows must be computed as in the whole product (then the split changes no
/// bit).
pub fn by_product_blocks(
    rows: &[usize],
    per: &[usize],
    inputs: &[usize],
    f: impl Fn(usize, std::ops::Range<usize>) -> Vec<f32> + Sync,
) -> Vec<Vec<f32>> {
    let units: Vec<(usize, std::ops::Range<usize>)> = (0..rows.len())
        .flat_map(|i| {
            let (n, per) = (rows[i], per[i].max(1));
            (0..n).step_by(per).map(move |r| (i, r..(r + per).min(n)))
        })
        .collect();
    // Not zeroed first (serial work of every product): the units cover every row of every
    // product, and each writes its rows of each input row once.
    let mut ys: Vec<Vec<f32>> = rows
        .iter()
        .zip(inputs)
        .map(|(&r, &t)| Vec::with_capacity(r * t.max(1)))
        .collect();
    let bufs: Vec<Blocks<f32>> = ys.iter_mut().map(|y| Blocks(y.as_mut_ptr())).collect();
    par_for(units.len(), &|u| {
        let (i, b) = (units[u].0, units[u].1.clone());
        let out = f(i, b.clone());
        let t = inputs[i].max(1);
        assert_eq!(out.len(), t * b.len(), "a block's outputs: inputs × rows");
        for (k, src) in out.chunks_exact(b.len()).enumerate() {
            // SAFETY: `ys[i]` has room for `t · rows[i]` values and outlives the region; the
            // units of product `i` have disjoint row ranges, so each writes its own parts.
            unsafe { bufs[i].write(k * rows[i] + b.start, src) };
        }
    });
    for (y, (&r, &t)) in ys.iter_mut().zip(rows.iter().zip(inputs)) {
        // SAFETY: every unit ran (a panicking one is re-raised above, before this), and the
        // units of product `i` cover its `rows[i]` rows for each of its `t` input rows.
        unsafe { y.set_len(r * t.max(1)) };
    }
    ys
}

/// As [`by_blocks`] over two buffers cut into the same number of blocks: `f(start, a_part,
/// b_part)` on block `k` of `a` (`block` elements, `start` its first) and of `b` (`block_b`
/// elements), on the context's threads when they hold `work` or more elements of work. Two
/// products of a step that go through the same rows (a prompt's queries and keys, the residual
/// and its norm) in one parallel region instead of one each.
pub fn by_block_pairs<T: Send, U: Send>(
    (a, block): (&mut [T], usize),
    (b, block_b): (&mut [U], usize),
    work: usize,
    f: impl Fn(usize, &mut [T], &mut [U]) + Sync,
) {
    let (block, block_b) = (block.max(1), block_b.max(1));
    let (la, lb) = (a.len(), b.len());
    let n = la.div_ceil(block);
    assert_eq!(n, lb.div_ceil(block_b), "two buffers of as many blocks");
    match current_pool() {
        Some(pool) if splits(work) && n > 1 => {
            let (pa, pb) = (Blocks(a.as_mut_ptr()), Blocks(b.as_mut_ptr()));
            pool.run(n, &|k| {
                let (s, e) = (k * block, ((k + 1) * block).min(la));
                let (sb, eb) = (k * block_b, ((k + 1) * block_b).min(lb));
                // SAFETY: block `k` of each buffer, claimed by this thread only.
                unsafe { f(s, pa.part(s, e - s), pb.part(sb, eb - sb)) };
            });
        }
        _ => {
            for (k, (pa, pb)) in a.chunks_mut(block).zip(b.chunks_mut(block_b)).enumerate() {
                f(k * block, pa, pb);
            }
        }
    }
}

/// Runs `f(start, part)` over blocks of `data` (`block` elements each, the last shorter) on the
/// context's threads when `data` holds `work` or more elements of work.
pub fn by_blocks<T: Send>(
    data: &mut [T],
    block: usize,
    work: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let block = block.max(1);
    let len = data.len();
    match current_pool() {
        Some(pool) if splits(work) && len > block => {
            let buf = Blocks(data.as_mut_ptr());
            pool.run(len.div_ceil(block), &|b| {
                let (s, e) = (b * block, ((b + 1) * block).min(len));
                // SAFETY: block `b` is elements s..e of `data`, claimed by this thread only.
                f(s, unsafe { buf.part(s, e - s) });
            });
        }
        _ => {
            for (b, part) in data.chunks_mut(block).enumerate() {
                f(b * block, part);
            }
        }
    }
}
