//! Expert loads off the compute thread.
//!
//! The cache decides *what* is resident on the engine thread, in trace order, so hit counts never
//! depend on timing; the loader only decides *when* the bytes arrive. With `threads = 0` every
//! load runs inline on the engine thread (the load time is fully exposed). With worker threads a
//! step's demand misses load in parallel, and lookahead prefetches are issued at the end of one
//! MoE layer and run while the engine computes the next layer's attention and router: the engine
//! waits only for what has not arrived when it is needed.
//!
//! Each load reports its own duration, and every wait on the engine thread is timed, so the
//! fraction of prefetch load time hidden behind compute is measured, not inferred.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::error::{Error, Result};

use super::store::{ExpertStore, ExpertWeights};
use super::ExpertKey;

struct Job {
    id: u64,
    key: ExpertKey,
}

struct Done {
    id: u64,
    key: ExpertKey,
    result: Result<Arc<ExpertWeights>>,
    /// Duration of the load itself (on whichever thread ran it).
    ns: u64,
}

#[derive(Debug, Clone, Copy)]
struct Ticket {
    id: u64,
    prefetch: bool,
    /// Loaded on the calling thread.
    inline: bool,
}

/// Load-time accounting, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LoadStats {
    /// Time the engine thread spent loading or waiting for demand misses.
    pub demand_exposed_ns: u64,
    /// Summed durations of prefetch loads whose experts were later used.
    pub prefetch_used_load_ns: u64,
    /// Time the engine thread spent loading or waiting for those prefetches.
    pub prefetch_used_exposed_ns: u64,
    /// Summed durations of every prefetch load that completed, used or not.
    pub prefetch_load_ns: u64,
    /// Time the engine thread spent on prefetch loads it ran inline (no worker threads).
    pub prefetch_inline_ns: u64,
}

impl LoadStats {
    /// Fraction of the load time of used prefetches that the engine never waited for.
    pub fn prefetch_hidden(&self) -> Option<f64> {
        (self.prefetch_used_load_ns > 0).then(|| {
            1.0 - (self.prefetch_used_exposed_ns as f64 / self.prefetch_used_load_ns as f64)
                .min(1.0)
        })
    }

    /// The counters accumulated since `before` was taken.
    pub fn since(&self, before: &LoadStats) -> LoadStats {
        LoadStats {
            demand_exposed_ns: self
                .demand_exposed_ns
                .saturating_sub(before.demand_exposed_ns),
            prefetch_used_load_ns: self
                .prefetch_used_load_ns
                .saturating_sub(before.prefetch_used_load_ns),
            prefetch_used_exposed_ns: self
                .prefetch_used_exposed_ns
                .saturating_sub(before.prefetch_used_exposed_ns),
            prefetch_load_ns: self
                .prefetch_load_ns
                .saturating_sub(before.prefetch_load_ns),
            prefetch_inline_ns: self
                .prefetch_inline_ns
                .saturating_sub(before.prefetch_inline_ns),
        }
    }
}

/// Runs expert loads inline or on a pool of worker threads.
pub struct Loader {
    store: Arc<ExpertStore>,
    threads: usize,
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    done_tx: Sender<Done>,
    workers: Vec<JoinHandle<()>>,
    inflight: HashMap<ExpertKey, Ticket>,
    arrived: HashMap<ExpertKey, Done>,
    next_id: u64,
    /// Jobs handed to the workers whose result has not come back yet (cancelled ones included).
    outstanding: usize,
    stats: LoadStats,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("threads", &self.threads)
            .field("inflight", &self.inflight.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl Loader {
    /// A loader over `store` with `threads` workers (0: inline on the calling thread).
    pub fn new(store: Arc<ExpertStore>, threads: usize) -> Result<Self> {
        let (done_tx, done) = channel();
        let mut l = Loader {
            store,
            threads,
            jobs: None,
            done,
            done_tx,
            workers: Vec::new(),
            inflight: HashMap::new(),
            arrived: HashMap::new(),
            next_id: 0,
            outstanding: 0,
            stats: LoadStats::default(),
        };
        if threads > 0 {
            let (tx, rx) = channel::<Job>();
            let rx = Arc::new(Mutex::new(rx));
            for n in 0..threads {
                let (rx, out, store) = (rx.clone(), l.done_tx.clone(), l.store.clone());
                let w = std::thread::Builder::new()
                    .name(format!("expert-loader-{n}"))
                    .spawn(move || loop {
                        let job = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return,
                        };
                        let Ok(Job { id, key }) = job else { return };
                        let t = Instant::now();
                        // A panic must not leave the engine waiting forever for this key.
                        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            store.load(key)
                        }))
                        .unwrap_or_else(|_| {
                            Err(Error::Input(format!(
                                "internal: the expert loader panicked loading {key:?}"
                            )))
                        });
                        let ns = t.elapsed().as_nanos() as u64;
                        if out
                            .send(Done {
                                id,
                                key,
                                result,
                                ns,
                            })
                            .is_err()
                        {
                            return;
                        }
                    })
                    .map_err(|e| Error::Input(format!("cannot start a loader thread: {e}")))?;
                l.workers.push(w);
            }
            l.jobs = Some(tx);
        }
        Ok(l)
    }

    /// Worker threads (0: inline).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Counters so far.
    pub fn stats(&self) -> LoadStats {
        self.stats
    }

    /// Zeroes the counters.
    pub fn reset_stats(&mut self) {
        self.stats = LoadStats::default();
    }

    /// Whether a load of `key` is pending or arrived and unclaimed.
    pub fn has(&self, key: ExpertKey) -> bool {
        self.inflight.contains_key(&key)
    }

    /// Starts loading `key`. Returns the nanoseconds the caller spent (the whole load when
    /// inline, 0 with workers).
    pub fn submit(&mut self, key: ExpertKey, prefetch: bool) -> Result<u64> {
        self.submit_on(key, prefetch, false)
    }

    /// Loads `key` on the calling thread even with workers (a step's last demand miss: the step
    /// waits for it anyway, and handing it over would add a thread hand-off each way). Returns
    /// the nanoseconds it took.
    pub fn load_here(&mut self, key: ExpertKey) -> Result<u64> {
        self.submit_on(key, false, true)
    }

    fn submit_on(&mut self, key: ExpertKey, prefetch: bool, here: bool) -> Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let inline = here || self.jobs.is_none();
        self.inflight.insert(
            key,
            Ticket {
                id,
                prefetch,
                inline,
            },
        );
        match self.jobs.as_ref().filter(|_| !inline) {
            Some(tx) => {
                tx.send(Job { id, key })
                    .map_err(|_| Error::Input("expert loader threads stopped".into()))?;
                self.outstanding += 1;
                Ok(0)
            }
            None => {
                let t = Instant::now();
                let result = self.store.load(key);
                let ns = t.elapsed().as_nanos() as u64;
                if prefetch {
                    self.stats.prefetch_load_ns += ns;
                    self.stats.prefetch_inline_ns += ns;
                }
                self.arrived.insert(
                    key,
                    Done {
                        id,
                        key,
                        result,
                        ns,
                    },
                );
                Ok(ns)
            }
        }
    }

    /// Forgets a pending load (its expert was evicted before use); a late result is dropped.
    pub fn cancel(&mut self, key: ExpertKey) {
        self.inflight.remove(&key);
        self.arrived.remove(&key);
    }

    /// Waits until every job handed to the workers has come back (cancelled ones too), so that
    /// no read is still running: byte counters read afterwards are final, and a measurement
    /// that starts afterwards does not pay for an earlier one's background reads.
    pub fn settle(&mut self) {
        while self.outstanding > 0 {
            match self.done.recv() {
                Ok(d) => self.accept(d),
                Err(_) => break,
            }
        }
    }

    /// Forgets every pending load.
    pub fn clear(&mut self) {
        self.inflight.clear();
        self.arrived.clear();
    }

    /// Waits for `key`'s load and claims it: the weights and the nanoseconds the caller waited
    /// (plus, for an inline prefetch, the time its load took on this thread earlier). `None` if
    /// no load of `key` is pending.
    pub fn claim(&mut self, key: ExpertKey) -> Option<Result<(Arc<ExpertWeights>, u64)>> {
        let ticket = *self.inflight.get(&key)?;
        let t = Instant::now();
        while !self.arrived.contains_key(&key) {
            match self.done.recv() {
                Ok(d) => self.accept(d),
                Err(_) => return Some(Err(Error::Input("expert loader threads stopped".into()))),
            }
        }
        let waited = t.elapsed().as_nanos() as u64;
        self.inflight.remove(&key);
        let d = self.arrived.remove(&key).expect("arrived");
        let inline = ticket.inline;
        if ticket.prefetch {
            self.stats.prefetch_used_load_ns += d.ns;
            self.stats.prefetch_used_exposed_ns += if inline { d.ns } else { waited };
        } else {
            self.stats.demand_exposed_ns += if inline { d.ns } else { waited };
        }
        Some(d.result.map(|w| (w, waited)))
    }

    fn accept(&mut self, d: Done) {
        self.outstanding = self.outstanding.saturating_sub(1);
        if self.inflight.get(&d.key).map(|t| t.id) == Some(d.id) {
            if self.inflight[&d.key].prefetch {
                self.stats.prefetch_load_ns += d.ns;
            }
            self.arrived.insert(d.key, d);
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
