//! A fork-join pool for the many short products of a decode step.
//!
//! A decode step of a small MoE is ~150 matrix-vector products of 20–100 µs each. Handing each
//! to sleeping threads (rayon's workers park after a short spin) costs a futex wake-up and a
//! reschedule per product, about as long as the product: two cores decoded only 1.1× faster than
//! one. Here the workers spin for a while after each job (llama.cpp's threads do the same
//! within a graph), so the next product starts on them within a microsecond; they park on a
//! condition variable after [`SPIN`] without work.
//!
//! [`SpinPool::run`] splits a job into `n` blocks, dealt as contiguous ranges, one per thread
//! (the calling thread and the workers). A thread claims the blocks of its own range one at a
//! time with a `fetch_add` on that range's word (on a cache line of its own, so the claims of
//! different threads do not contend), then takes what is left of the others' ranges the same
//! way. One shared claim counter cost ~100–300 ns a claim at 16 threads on the GPU machine's
//! host, serialised: the last thread started its first block microseconds into every region.
//! The claimed block's closure is read after the claim, so a thread always runs a block of the
//! job whose range word it claimed from.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a worker spins for the next job before it parks.
const SPIN: Duration = Duration::from_millis(2);

thread_local! {
    /// Whether [`SpinPool::run`] called from this thread counts its parallel regions, how many
    /// it counted and their wall time in nanoseconds (from the job's start to its last block's
    /// end). Per calling thread — a forward call's engine thread — so that two engines (or two
    /// tests) in one process count only their own.
    static REGIONS: Cell<(bool, u64, u64)> = const { Cell::new((false, 0, 0)) };
}

/// Turns the counting of this thread's parallel regions on or off (profiled forward calls).
pub fn count_regions(on: bool) {
    REGIONS.with(|r| {
        let (_, n, ns) = r.get();
        r.set((on, n, ns));
    });
}

/// Parallel regions this thread has run while counting, and the seconds spent in them: what
/// of a step ran spread over the threads (the rest of its time ran on this thread alone).
pub fn regions() -> (u64, f64) {
    let (_, n, ns) = REGIONS.with(|r| r.get());
    (n, ns as f64 * 1e-9)
}

/// One job: the closure over block indices (on the stack of [`SpinPool::run`]'s caller).
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
}

/// `state`: epoch (24 bits) · blocks (20 bits); what a spinning worker watches for a new job.
const FIELD: u64 = (1 << 20) - 1;
fn pack(epoch: u64, n: u64) -> u64 {
    (epoch << 40) | (n << 20)
}
fn epoch(s: u64) -> u64 {
    s >> 40
}

/// A range's word: its end (high 32 bits) and its next unclaimed block (low 32 bits).
fn range(end: u64, next: u64) -> u64 {
    (end << 32) | next
}

/// A value alone on its cache lines (128 bytes: two lines, for adjacent-line prefetchers), so
/// that writes to one of [`Shared`]'s counters do not invalidate the line every spinning
/// thread reads.
#[repr(align(128))]
struct Line<T>(T);

impl<T> std::ops::Deref for Line<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

struct Shared {
    /// Epoch and block count of the current job; read by every spinner.
    state: Line<AtomicU64>,
    /// Per thread (the caller first), its range of the current job's blocks ([`range`]).
    ranges: Box<[Line<AtomicU64>]>,
    job: AtomicPtr<Job<'static>>,
    /// Blocks finished (each thread adds its count once a job, `run` polls): on a line of its
    /// own.
    done: Line<AtomicUsize>,
    /// A block of the current job panicked (re-raised by `run` once every block is done).
    panicked: AtomicBool,
    stop: AtomicBool,
    sleeping: AtomicUsize,
    park: Mutex<()>,
    wake: Condvar,
}

impl Shared {
    /// Claims and runs blocks of the current job until none is left — its own range first
    /// (thread `me`), then the others' in turn — then adds how many it ran to `done` (once: a
    /// contended add per block cost as much as a claim).
    ///
    /// A claim is a `fetch_add` on a range's word; the one that finds the range exhausted adds
    /// one past its end (at most once per thread, range and job: far below the 32-bit field),
    /// and the next job's words overwrite it. Ranges another thread may still hold are read
    /// first, and claimed only if they look unfinished. A claim that lands on a range word of a
    /// job published after this thread last looked is a valid claim of that job: the caller
    /// writes each range word (release) after the job's closure, `done` and the earlier ranges,
    /// the claim reads it (acquire), the closure is loaded after it, and that job can neither
    /// end nor be replaced before the block runs.
    fn work(&self, me: usize) {
        let t = self.ranges.len();
        let mut ran = 0;
        for j in 0..t {
            let r = &self.ranges[(me + j) % t];
            let left = |v: u64| (v & u32::MAX as u64) < v >> 32;
            if j > 0 && !left(r.load(Ordering::Relaxed)) {
                continue;
            }
            loop {
                let v = r.fetch_add(1, Ordering::AcqRel);
                if !left(v) {
                    break;
                }
                // SAFETY: the claim read the range word of a job with block `i` left, whose
                // caller waits in `run` for this block; `job` was stored before that word was
                // published and is not replaced before the job ends, so it points to its live
                // `Job`.
                let f = unsafe { (*self.job.load(Ordering::Acquire)).f };
                // A panic must neither kill a worker (the job would never finish) nor unwind
                // `run` while other threads still use the job on its stack.
                let i = (v & u32::MAX as u64) as usize;
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i))).is_err() {
                    self.panicked.store(true, Ordering::Release);
                }
                ran += 1;
            }
        }
        if ran > 0 {
            self.done.fetch_add(ran, Ordering::Release);
        }
    }
}

thread_local! {
    /// Set while this thread runs a block: a nested `run` goes serial instead of deadlocking.
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
}

/// Spinning fork-join workers (see the module docs).
pub struct SpinPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    busy: Mutex<()>,
    epoch: AtomicU64,
}

impl std::fmt::Debug for SpinPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SpinPool({} threads)", self.threads())
    }
}

impl SpinPool {
    /// A pool of `threads` threads in all: the caller of [`SpinPool::run`] and `threads − 1`
    /// workers.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Line(AtomicU64::new(0)),
            ranges: (0..threads.max(1))
                .map(|_| Line(AtomicU64::new(0)))
                .collect(),
            job: AtomicPtr::new(std::ptr::null_mut()),
            done: Line(AtomicUsize::new(0)),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            sleeping: AtomicUsize::new(0),
            park: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut workers = Vec::new();
        for i in 1..threads.max(1) {
            let sh = shared.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("compute-{i}"))
                    .spawn(move || worker(&sh, i))?,
            );
        }
        Ok(SpinPool {
            shared,
            workers,
            busy: Mutex::new(()),
            epoch: AtomicU64::new(0),
        })
    }

    /// Whether the calling thread is running a block of a job (where [`SpinPool::run`] is serial).
    pub fn in_job(&self) -> bool {
        IN_JOB.with(|j| j.get())
    }

    /// Threads that run blocks (the caller included).
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `f(i)` for every block `i < n`, on the calling thread and the workers; returns when
    /// all are done. Serial when the pool has one thread, when called from inside a block, or
    /// while another thread runs a job on this pool.
    pub fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        let serial = || (0..n).for_each(f);
        if n <= 1 || self.workers.is_empty() || IN_JOB.with(|j| j.get()) || n as u64 > FIELD {
            return serial();
        }
        let Ok(_busy) = self.busy.try_lock() else {
            return serial();
        };
        let t0 = REGIONS.with(|r| r.get().0).then(Instant::now);
        let sh = &*self.shared;
        let job = Job { f };
        // SAFETY: the pointer is only dereferenced by a worker holding a claim of this epoch,
        // and this function returns only after every claimed block is done.
        let ptr = &job as *const Job<'_> as *mut Job<'static>;
        sh.job.store(ptr, Ordering::Release);
        sh.done.store(0, Ordering::Relaxed);
        // Contiguous ranges, one per thread, the caller's first.
        let (t, n64) = (sh.ranges.len() as u64, n as u64);
        let per = n64.div_ceil(t);
        for (k, r) in sh.ranges.iter().enumerate() {
            let k = k as u64;
            r.store(
                range((per * (k + 1)).min(n64), (per * k).min(n64)),
                Ordering::Release,
            );
        }
        let e = (self.epoch.fetch_add(1, Ordering::Relaxed) + 1) & ((1 << 24) - 1);
        sh.state.store(pack(e, n64), Ordering::SeqCst);
        if sh.sleeping.load(Ordering::SeqCst) > 0 {
            let _g = sh.park.lock().unwrap_or_else(|p| p.into_inner());
            sh.wake.notify_all();
        }
        IN_JOB.with(|j| j.set(true));
        sh.work(0);
        IN_JOB.with(|j| j.set(false));
        while sh.done.load(Ordering::Acquire) < n {
            std::hint::spin_loop();
        }
        if sh.panicked.swap(false, Ordering::AcqRel) {
            panic!("a block of a parallel product panicked (see the message above)");
        }
        if let Some(t0) = t0 {
            let ns = t0.elapsed().as_nanos() as u64;
            REGIONS.with(|r| {
                let (on, n, total) = r.get();
                r.set((on, n + 1, total + ns));
            });
        }
    }
}

fn worker(sh: &Shared, me: usize) {
    IN_JOB.with(|j| j.set(true));
    let mut seen = 0u64;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        let e = loop {
            if sh.stop.load(Ordering::Acquire) {
                return;
            }
            let s = sh.state.load(Ordering::Acquire);
            if epoch(s) != seen {
                break epoch(s);
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(1024) || start.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let mut g = sh.park.lock().unwrap_or_else(|p| p.into_inner());
            sh.sleeping.fetch_add(1, Ordering::SeqCst);
            while epoch(sh.state.load(Ordering::SeqCst)) == seen && !sh.stop.load(Ordering::SeqCst)
            {
                g = sh.wake.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            sh.sleeping.fetch_sub(1, Ordering::SeqCst);
        };
        seen = e;
        sh.work(me);
    }
}

impl Drop for SpinPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.park.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// A value made once by the first thread that asks for it, the others spinning until it is
/// there: the blocks of one product in a parallel region sharing its quantized input
/// (the room of `weights::QuantizedRows`). `std::sync::OnceLock` parks the threads that wait in
/// the kernel; their wake-up cost more than the quantizing they saved (on the 16-core host a
/// 16-token prompt's q/k/v product took 243 µs at 16 threads, 175 µs at 8).
pub struct SpinOnce<T> {
    /// 0: empty, 1: being made, 2: made.
    state: AtomicU8,
    value: std::cell::UnsafeCell<Option<T>>,
}

// SAFETY: the value is written once, by the thread that moved `state` from 0 to 1, before it
// stores 2 (release); it is read only after a thread loads 2 (acquire), and never written again.
unsafe impl<T: Send + Sync> Sync for SpinOnce<T> {}

impl<T> Default for SpinOnce<T> {
    fn default() -> Self {
        SpinOnce {
            state: AtomicU8::new(0),
            value: std::cell::UnsafeCell::new(None),
        }
    }
}

impl<T> SpinOnce<T> {
    /// The value, made by `f` on this thread if no thread has started making it; else waits
    /// (spinning) for the thread that has. If `f` panics, so does every waiter (state 3), so
    /// that a parallel region's blocks all end and the pool re-raises the panic.
    pub fn get_or_init(&self, f: impl FnOnce() -> T) -> &T {
        /// Marks the value failed unless forgotten after it was made.
        struct Failed<'a>(&'a AtomicU8);
        impl Drop for Failed<'_> {
            fn drop(&mut self) {
                self.0.store(3, Ordering::Release);
            }
        }
        if self
            .state
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Acquire)
            .is_ok()
        {
            let failed = Failed(&self.state);
            let v = f();
            std::mem::forget(failed);
            // SAFETY: this thread alone moved the state to 1: no other thread touches the
            // value until it is 2.
            unsafe { *self.value.get() = Some(v) };
            self.state.store(2, Ordering::Release);
        } else {
            loop {
                match self.state.load(Ordering::Acquire) {
                    2 => break,
                    3 => panic!("the thread making a shared value panicked"),
                    _ => std::hint::spin_loop(),
                }
            }
        }
        // SAFETY: the state is 2: the value was written and will not be written again.
        unsafe { (*self.value.get()).as_ref() }.expect("a made value")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_block_runs_once_in_every_job_even_after_the_workers_park() {
        let pool = SpinPool::new(3).unwrap();
        for round in 0..200 {
            let n = 1 + round % 37;
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "round {round}"
            );
            if round == 100 {
                std::thread::sleep(SPIN * 3); // the workers park; the next job wakes them
            }
        }
        // Nested runs go serial instead of deadlocking.
        let total = AtomicUsize::new(0);
        pool.run(4, &|_| {
            pool.run(3, &|_| {
                total.fetch_add(1, Ordering::Relaxed);
            })
        });
        assert_eq!(total.load(Ordering::Relaxed), 12);
        // A panicking block is re-raised on the caller once every block is done, and the
        // pool keeps working.
        let ran = AtomicUsize::new(0);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(8, &|i| {
                ran.fetch_add(1, Ordering::Relaxed);
                assert!(i != 5, "block 5 fails");
            })
        }));
        assert!(r.is_err());
        assert_eq!(ran.load(Ordering::Relaxed), 8);
        let again = AtomicUsize::new(0);
        pool.run(8, &|_| {
            again.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(again.load(Ordering::Relaxed), 8);
    }

    /// A `SpinOnce` raced by several threads runs its maker once and gives every thread that
    /// value; a maker that panics makes the waiters panic too (no thread spins forever).
    #[test]
    fn spin_once_makes_its_value_once_and_a_failure_reaches_every_waiter() {
        for _ in 0..50 {
            let once = SpinOnce::default();
            let made = AtomicUsize::new(0);
            std::thread::scope(|s| {
                for _ in 0..6 {
                    s.spawn(|| {
                        let v = once.get_or_init(|| {
                            made.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_micros(200));
                            vec![7u32; 100]
                        });
                        assert_eq!(v, &vec![7u32; 100]);
                    });
                }
            });
            assert_eq!(made.load(Ordering::Relaxed), 1);
        }
        let once: SpinOnce<u32> = SpinOnce::default();
        let panicked = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for i in 0..4 {
                let (once, panicked) = (&once, &panicked);
                s.spawn(move || {
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        *once.get_or_init(|| {
                            std::thread::sleep(Duration::from_millis(2 * (i + 1)));
                            panic!("maker fails")
                        })
                    }));
                    if r.is_err() {
                        panicked.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        assert_eq!(panicked.load(Ordering::Relaxed), 4);
    }

    /// More threads than cores: workers are preempted mid-job and come back after it ended,
    /// so their claims race the next job's ranges (the case `Shared::work`'s safety argument
    /// covers). Each job's blocks must still run exactly once, and only while it runs (each
    /// job's counters live on `run`'s caller's stack, as a product's closure does).
    #[test]
    fn every_block_runs_once_with_more_threads_than_cores() {
        let pool = SpinPool::new(6).unwrap();
        for round in 0..3000 {
            let n = 1 + (round * 7) % 53;
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            let live = AtomicBool::new(true);
            pool.run(n, &|i| {
                assert!(
                    live.load(Ordering::Relaxed),
                    "a block ran after its job ended"
                );
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            live.store(false, Ordering::Relaxed);
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "round {round}: {:?}",
                hits.iter()
                    .map(|h| h.load(Ordering::Relaxed))
                    .collect::<Vec<_>>()
            );
        }
    }
}
