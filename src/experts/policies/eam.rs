//! `eam-<k>`: expert-activation-matrix matching, after MoE-Infinity (Xue et al., 2024).
//!
//! Definition: the policy keeps the *expert activation matrix* (EAM) of the request in
//! progress: per MoE layer of its pool and expert, the number of the request's tokens routed to
//! it so far. When a request ends its EAM joins a collection of past requests (the 1024 most
//! recent). The current EAM is matched against the collection by cosine similarity; the `k`
//! most similar past requests predict, per layer, each expert's activation ratio (its share of
//! the layer's activations in those requests, averaged). Before any request has finished, the
//! current request's own ratios stand in. The victim is the resident expert with the lowest
//! predicted ratio, ties to the least recently used. In the decode phase the policy also
//! prefetches, for the next MoE layer, its `top-k` experts with the highest predicted ratios
//! (as many as the step's router selected) — the driver asks [`Policy::predict`].
//!
//! A pool sees only its own layers: with per-layer budgets each layer matches its own row of
//! the EAM; with a global byte budget the whole matrix is matched, as in MoE-Infinity.
//! MoE-Infinity further weighs experts by the distance of their layer from the one executing;
//! that refinement is not modelled.

use std::cell::RefCell;
use std::collections::VecDeque;

use super::{Access, Guard, InsertKind, Policy, ScanSet};

/// Past requests kept for matching.
const HISTORY: usize = 1024;

#[derive(Debug, Clone, Copy)]
struct Meta {
    row: u32,
    expert: u32,
    last: u64,
}

/// One request's activation counts, per pool row, per expert.
#[derive(Debug, Clone, Default)]
struct Matrix {
    rows: Vec<Vec<f32>>,
}

impl Matrix {
    fn new(n_rows: usize) -> Self {
        Matrix {
            rows: vec![Vec::new(); n_rows],
        }
    }

    fn add(&mut self, row: usize, expert: usize) {
        let r = &mut self.rows[row];
        if r.len() <= expert {
            r.resize(expert + 1, 0.0);
        }
        r[expert] += 1.0;
    }

    fn is_empty(&self) -> bool {
        self.rows.iter().all(|r| r.is_empty())
    }

    fn norm(&self) -> f64 {
        self.rows
            .iter()
            .flatten()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt()
    }

    fn dot(&self, other: &Matrix) -> f64 {
        self.rows
            .iter()
            .zip(&other.rows)
            .map(|(a, b)| {
                a.iter()
                    .zip(b)
                    .map(|(&x, &y)| f64::from(x) * f64::from(y))
                    .sum::<f64>()
            })
            .sum()
    }

    /// Adds this matrix's per-row activation ratios into `into`.
    fn add_ratios(&self, into: &mut [Vec<f64>]) {
        for (r, out) in self.rows.iter().zip(into.iter_mut()) {
            let total: f64 = r.iter().map(|&v| f64::from(v)).sum();
            if total == 0.0 {
                continue;
            }
            if out.len() < r.len() {
                out.resize(r.len(), 0.0);
            }
            for (o, &v) in out.iter_mut().zip(r) {
                *o += f64::from(v) / total;
            }
        }
    }
}

/// A past request: its matrix and norm.
#[derive(Debug, Clone)]
struct Past {
    eam: Matrix,
    norm: f64,
}

/// The EAM matcher and resident set of one pool.
#[derive(Debug)]
pub struct Eam {
    k: usize,
    /// Layer position → row of this pool (`u32::MAX`: not in the pool).
    rows: Vec<u32>,
    current: Matrix,
    request: Option<u32>,
    history: VecDeque<Past>,
    resident: ScanSet<Meta>,
    /// Changes of the current matrix or the history so far.
    version: u64,
    /// The prediction for `version`: per row, per expert, the predicted activation ratio.
    predicted: RefCell<(u64, Vec<Vec<f64>>)>,
}

impl Eam {
    /// A matcher over `k` past requests for a pool holding `pool_layers` of `moe_layers`.
    pub fn new(k: usize, moe_layers: &[u32], pool_layers: &[u32]) -> Self {
        let rows = moe_layers
            .iter()
            .map(|l| {
                pool_layers
                    .iter()
                    .position(|p| p == l)
                    .map_or(u32::MAX, |r| r as u32)
            })
            .collect();
        Eam {
            k: k.max(1),
            rows,
            current: Matrix::new(pool_layers.len()),
            request: None,
            history: VecDeque::new(),
            resident: ScanSet::default(),
            version: 0,
            predicted: RefCell::new((u64::MAX, Vec::new())),
        }
    }

    fn row(&self, layer_pos: u32) -> Option<usize> {
        match self.rows.get(layer_pos as usize) {
            Some(&r) if r != u32::MAX => Some(r as usize),
            _ => None,
        }
    }

    fn count(&mut self, access: &Access) {
        if let Some(r) = self.row(access.layer_pos) {
            self.current.add(r, access.key.expert as usize);
            self.version += 1;
        }
    }

    /// Runs `f` on the prediction for the current state (recomputed when it changed).
    fn with_prediction<R>(&self, f: impl FnOnce(&[Vec<f64>]) -> R) -> R {
        let mut cached = self.predicted.borrow_mut();
        if cached.0 != self.version {
            let mut pred = vec![Vec::new(); self.current.rows.len()];
            if self.history.is_empty() {
                self.current.add_ratios(&mut pred);
            } else {
                let norm = self.current.norm();
                let mut sims: Vec<(f64, usize)> = self
                    .history
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let s = if norm == 0.0 || p.norm == 0.0 {
                            0.0
                        } else {
                            self.current.dot(&p.eam) / (norm * p.norm)
                        };
                        (s, i)
                    })
                    .collect();
                // Most similar first; ties to the most recent request.
                sims.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)));
                let n = self.k.min(sims.len());
                for &(_, i) in &sims[..n] {
                    self.history[i].eam.add_ratios(&mut pred);
                }
                for r in &mut pred {
                    r.iter_mut().for_each(|v| *v /= n as f64);
                }
            }
            *cached = (self.version, pred);
        }
        f(&cached.1)
    }
}

impl Policy for Eam {
    fn on_hit(&mut self, id: u32, access: &Access) {
        self.count(access);
        self.resident.get_mut(id).last = access.seq;
    }

    fn on_insert(&mut self, id: u32, access: &Access, kind: InsertKind) {
        if kind == InsertKind::Demand {
            self.count(access);
        }
        let row = self.row(access.layer_pos).map_or(u32::MAX, |r| r as u32);
        self.resident.insert(
            id,
            Meta {
                row,
                expert: access.key.expert,
                last: access.seq,
            },
        );
    }

    fn to_evict(&self, guard: &Guard<'_>) -> Option<u32> {
        self.with_prediction(|pred| {
            self.resident.lowest(guard, |m| {
                let p = pred
                    .get(m.row as usize)
                    .and_then(|r| r.get(m.expert as usize))
                    .copied()
                    .unwrap_or(0.0);
                (p, m.last)
            })
        })
    }

    fn remove(&mut self, id: u32) {
        self.resident.remove(id);
    }

    fn on_request(&mut self, request: u32) {
        if self.request == Some(request) {
            return;
        }
        self.request = Some(request);
        if self.current.is_empty() {
            return;
        }
        let n_rows = self.current.rows.len();
        let eam = std::mem::replace(&mut self.current, Matrix::new(n_rows));
        let norm = eam.norm();
        self.history.push_back(Past { eam, norm });
        if self.history.len() > HISTORY {
            self.history.pop_front();
        }
        self.version += 1;
    }

    fn predict(&self, layer_pos: u32, n: usize, out: &mut Vec<u32>) {
        let Some(row) = self.row(layer_pos) else {
            return;
        };
        self.with_prediction(|pred| {
            let Some(r) = pred.get(row) else {
                return;
            };
            let mut ids: Vec<u32> = (0..r.len() as u32)
                .filter(|&e| r[e as usize] > 0.0)
                .collect();
            ids.sort_by(|&a, &b| r[b as usize].total_cmp(&r[a as usize]).then(a.cmp(&b)));
            out.extend(ids.into_iter().take(n));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Access, Guard, InsertKind, Policy};
    use super::Eam;

    fn access(e: u32, seq: u64) -> Access {
        super::super::testutil::access(0, e, seq, seq, 1.0)
    }

    /// Demands `experts` in order on a one-layer pool of unlimited size (ids = expert ids).
    fn demand(p: &mut Eam, resident: &mut [bool], experts: &[u32], seq: &mut u64) {
        for &e in experts {
            *seq += 1;
            if resident[e as usize] {
                p.on_hit(e, &access(e, *seq));
            } else {
                p.on_insert(e, &access(e, *seq), InsertKind::Demand);
                resident[e as usize] = true;
            }
        }
    }

    #[test]
    fn the_most_similar_past_request_decides() {
        // Hand-checked, k = 1. Request 0 uses experts {1, 2} (1 three times, 2 once);
        // request 1 uses {3, 4} (4 three times, 3 once). Request 2 has used 4 once so far:
        // cosine with request 0 = 0, with request 1 = 3/sqrt(10) > 0 -> request 1 predicts
        // 4: 0.75, 3: 0.25, 1 and 2: 0.
        let mut p = Eam::new(1, &[0], &[0]);
        let mut res = vec![false; 8];
        let mut seq = 0;
        p.on_request(0);
        demand(&mut p, &mut res, &[1, 1, 2, 1], &mut seq);
        p.on_request(1);
        demand(&mut p, &mut res, &[4, 3, 4, 4], &mut seq);
        p.on_request(2);
        demand(&mut p, &mut res, &[4], &mut seq);
        let flags = [0u8; 8];
        // Residents 1, 2, 3, 4: predicted 0, 0, 0.25, 0.75; 1 and 2 tie at 0 -> the least
        // recent, 2 (last used at seq 3; 1 at seq 4).
        assert_eq!(p.to_evict(&Guard::new(&flags, &[9])), Some(2));
        let mut out = Vec::new();
        p.predict(0, 4, &mut out);
        assert_eq!(out, vec![4, 3]);
        // Guarding 1 and 2: 3 goes before 4.
        let flags = [0u8, 1, 1, 0, 0, 0, 0, 0];
        assert_eq!(p.to_evict(&Guard::new(&flags, &[9])), Some(3));
    }

    #[test]
    fn without_history_the_request_itself_predicts() {
        let mut p = Eam::new(4, &[0], &[0]);
        let mut res = vec![false; 8];
        let mut seq = 0;
        p.on_request(5);
        demand(&mut p, &mut res, &[2, 2, 5, 2, 6, 5], &mut seq);
        let mut out = Vec::new();
        p.predict(0, 2, &mut out);
        assert_eq!(out, vec![2, 5]);
        let flags = [0u8; 8];
        assert_eq!(p.to_evict(&Guard::new(&flags, &[7])), Some(6));
        // Another layer's position is not this pool's: nothing predicted.
        out.clear();
        p.predict(1, 2, &mut out);
        assert!(out.is_empty());
    }
}
