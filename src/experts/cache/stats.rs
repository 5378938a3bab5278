//! Counters of the access driver: hits and accesses per phase and per layer, evictions, bytes,
//! and prefetch precision and recall.

use serde::Serialize;

/// Hits and accesses of one phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PhaseStats {
    /// Demand accesses.
    pub accesses: u64,
    /// Of which hits.
    pub hits: u64,
}

/// Hits and accesses of one MoE layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LayerStats {
    /// Decoder layer index.
    pub layer: u32,
    /// Demand accesses.
    pub accesses: u64,
    /// Of which hits.
    pub hits: u64,
}

/// Prefetch counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PrefetchStats {
    /// Prefetches that loaded an expert.
    pub issued: u64,
    /// Bytes they loaded.
    pub bytes: u64,
    /// Prefetches skipped because the expert was already resident.
    pub already_resident: u64,
    /// Prefetches dropped because nothing could be evicted (or the expert can never fit).
    pub dropped: u64,
    /// Issued prefetches whose expert was demanded while still resident.
    pub used: u64,
    /// Issued prefetches evicted before any demand.
    pub wasted: u64,
    /// Bytes of the wasted ones.
    pub wasted_bytes: u64,
}

/// Counters of a [`CacheCore`] since construction or [`CacheCore::reset`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CacheStats {
    /// What the misses ran, by the miss mode.
    pub miss: crate::experts::miss::MissStats,
    /// Demand accesses.
    pub accesses: u64,
    /// Demand hits (including first demands of prefetched experts).
    pub hits: u64,
    /// Demand misses (each one loaded an expert).
    pub misses: u64,
    /// Prefill-phase accesses and hits.
    pub prefill: PhaseStats,
    /// Decode-phase accesses and hits.
    pub decode: PhaseStats,
    /// Per MoE layer, in the order the layers were given.
    pub per_layer: Vec<LayerStats>,
    /// Entries evicted.
    pub evictions: u64,
    /// Bytes loaded by demand misses.
    pub bytes_loaded: u64,
    /// Bytes resident now.
    pub resident_bytes: u64,
    /// Largest `resident_bytes` seen.
    pub peak_resident_bytes: u64,
    /// Prefetch counters.
    pub prefetch: PrefetchStats,
}

impl CacheStats {
    /// hits / accesses (0 when there were none).
    pub fn hit_rate(&self) -> f64 {
        ratio(self.hits, self.accesses)
    }

    /// Used prefetches / issued prefetches; `None` if none was issued.
    pub fn prefetch_precision(&self) -> Option<f64> {
        (self.prefetch.issued > 0).then(|| ratio(self.prefetch.used, self.prefetch.issued))
    }

    /// Used prefetches / (used prefetches + demand misses): the share of the loads the demand
    /// path needed that prefetching had already done; `None` if there was nothing to load.
    pub fn prefetch_recall(&self) -> Option<f64> {
        let need = self.prefetch.used + self.misses;
        (need > 0).then(|| ratio(self.prefetch.used, need))
    }
}

/// `a / b`, 0 when `b` is 0.
pub(crate) fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}
