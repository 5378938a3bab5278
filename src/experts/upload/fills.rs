//! Misses a gated decode step copies itself (CUDA; see [`super::gates`]).
//!
//! While the host follows a gated step, the misses it loads on its own thread whose bytes all
//! lie in the registered shard mappings get a device buffer and no copy: their copies
//! ([`Fill`]) are collected here and handed to the layer's gate with its answer, and the gate's
//! grid makes them before the layer's experts run. Collecting is per thread (the host thread
//! that follows the step): loader threads' prefetches are copied by the copy engine as before.

use std::any::Any;
use std::cell::RefCell;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// What a copy's source lies in (a registration of shard mappings), kept until the step ran.
type Source = Arc<dyn Any + Send + Sync>;

/// One copy a gated step makes before its layer's experts run: `len` bytes from `src` (the
/// device address of registered host memory) to `dst` (an expert buffer's device address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fill {
    /// Source: device address of registered host memory.
    pub src: u64,
    /// Destination: device memory.
    pub dst: u64,
    /// Bytes.
    pub len: u64,
}

/// What a step's copies need until it has run: the registrations their sources lie in, and
/// the counter their GPU time goes to.
#[derive(Default)]
pub struct FillHold {
    regs: Vec<Source>,
    ns: Option<Arc<AtomicU64>>,
    experts: u64,
}

impl std::fmt::Debug for FillHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FillHold")
            .field("registrations", &self.regs.len())
            .finish()
    }
}

impl FillHold {
    /// The experts whose copies were collected.
    pub fn experts(&self) -> u64 {
        self.experts
    }

    /// Adds the copies' GPU time, once the step has run, to the uploader's counter.
    pub fn add_ns(&self, ns: u64) {
        if let Some(c) = &self.ns {
            c.fetch_add(ns, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

struct Collecting {
    fills: Vec<Fill>,
    room: usize,
    hold: FillHold,
}

thread_local! {
    static COLLECTING: RefCell<Option<Collecting>> = const { RefCell::new(None) };
}

/// Collects the copies of this thread's misses (at most `room` between two [`take`]s) until the
/// returned guard ends it; each answer takes those of its layer.
pub fn collect(room: usize) -> Collector {
    COLLECTING.with(|c| {
        *c.borrow_mut() = Some(Collecting {
            fills: Vec::new(),
            room,
            hold: FillHold::default(),
        })
    });
    Collector(std::marker::PhantomData)
}

/// Collecting on this thread (see [`collect`]); ended when dropped.
pub struct Collector(std::marker::PhantomData<*const ()>);

impl Collector {
    /// The copies collected since the last call.
    pub fn take(&self) -> Vec<Fill> {
        COLLECTING.with(|c| {
            c.borrow_mut()
                .as_mut()
                .map(|s| std::mem::take(&mut s.fills))
                .unwrap_or_default()
        })
    }

    /// Ends collecting: what the copies collected need until the step has run.
    pub fn finish(self) -> FillHold {
        COLLECTING.with(|c| c.borrow_mut().take().map(|s| s.hold).unwrap_or_default())
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        COLLECTING.with(|c| c.borrow_mut().take());
    }
}

/// Whether `n` more copies would be collected on this thread (collecting, with room, and not
/// turned off with `HARNESS_STEP_COPIES=0`).
pub(super) fn wants(n: usize) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var("HARNESS_STEP_COPIES").is_ok_and(|v| v == "0"));
    !off && COLLECTING.with(|c| {
        c.borrow()
            .as_ref()
            .is_some_and(|s| s.fills.len() + n <= s.room)
    })
}

/// Hands one expert's copies `fills` to the step collecting on this thread (the caller asked
/// [`wants`] first);
/// the step keeps `reg` until it has run and adds the copies' GPU time to `ns`.
pub(super) fn defer(fills: Vec<Fill>, reg: Source, ns: &Arc<AtomicU64>) {
    COLLECTING.with(|c| {
        if let Some(s) = c.borrow_mut().as_mut() {
            s.fills.extend(fills);
            s.hold.experts += 1;
            let same = |r: &Source| std::ptr::addr_eq(Arc::as_ptr(r), Arc::as_ptr(&reg));
            if !s.hold.regs.iter().any(same) {
                s.hold.regs.push(reg);
            }
            s.hold.ns.get_or_insert_with(|| ns.clone());
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn fill(i: u64) -> Fill {
        Fill {
            src: 0x1000 * i,
            dst: 0x9000 * i,
            len: i,
        }
    }

    #[test]
    fn a_step_collects_its_layers_copies_within_room_and_holds_their_sources() {
        assert!(!wants(1), "nothing collects before a step starts");
        let ns = Arc::new(AtomicU64::new(0));
        let reg: Source = Arc::new(5u32);
        let c = collect(18);
        assert!(wants(9) && wants(18) && !wants(19));
        defer((1..=9).map(fill).collect(), reg.clone(), &ns);
        assert!(
            wants(9) && !wants(10),
            "room is counted from the copies not yet taken"
        );
        defer((10..=18).map(fill).collect(), reg.clone(), &ns);
        assert!(!wants(1));
        let layer = c.take();
        assert_eq!(layer, (1..=18).map(fill).collect::<Vec<_>>());
        assert!(wants(18), "a take frees the room");
        assert!(c.take().is_empty());
        // A second thread collects nothing of this step's.
        std::thread::spawn(|| assert!(!wants(1))).join().unwrap();
        let hold = c.finish();
        assert!(!wants(1), "finish ends collecting");
        assert_eq!(hold.experts(), 2);
        assert_eq!(hold.regs.len(), 1, "one registration held once");
        assert_eq!(Arc::strong_count(&reg), 2);
        hold.add_ns(1500);
        assert_eq!(ns.load(Ordering::Relaxed), 1500);
        drop(hold);
        assert_eq!(Arc::strong_count(&reg), 1, "released once the step ran");
    }

    #[test]
    fn a_collector_dropped_early_ends_collecting() {
        {
            let _c = collect(9);
            assert!(wants(9));
        }
        assert!(!wants(1));
        // Nothing to hand copies to: deferring is then a no-op.
        defer(vec![fill(1)], Arc::new(()), &Arc::new(AtomicU64::new(0)));
        assert!(collect(9).take().is_empty());
    }
}
