//! What the process holds in memory, as Linux reports it (`/proc/self/status`): the resident set
//! split into file-backed pages (the mapped dense weights, the binary's code) and anonymous ones
//! (the expert cache, the KV cache, activations), and its high-water mark, which a cell resets at
//! its start (`/proc/self/clear_refs`) so every cell reports its own peak. Elsewhere every
//! reading is `None`.

use serde::{Deserialize, Serialize};

/// One reading of the process's memory, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rss {
    /// Peak resident set since the start or the last [`reset_peak`] (`VmHWM`).
    pub peak: u64,
    /// Resident anonymous memory now (`RssAnon`).
    pub anon: u64,
    /// Resident file-backed memory now (`RssFile`; shared memory counted with it).
    pub file: u64,
}

impl Rss {
    /// Reads `/proc/self/status`; `None` where there is none.
    pub fn now() -> Option<Rss> {
        let text = std::fs::read_to_string("/proc/self/status").ok()?;
        let field = |name: &str| -> Option<u64> {
            let line = text.lines().find(|l| l.starts_with(name))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        };
        Some(Rss {
            peak: field("VmHWM:")?,
            anon: field("RssAnon:")?,
            file: field("RssFile:")? + field("RssShmem:").unwrap_or(0),
        })
    }

    /// The larger of two readings, field by field (anonymous and file-backed peaks as sampled).
    pub fn max(self, other: Rss) -> Rss {
        Rss {
            peak: self.peak.max(other.peak),
            anon: self.anon.max(other.anon),
            file: self.file.max(other.file),
        }
    }
}

/// Resets the high-water mark to the current resident set (Linux ≥ 4.0); false where it cannot.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// What a run's memory went to: the resident peak next to what the lazy-loading model says it
/// should need (dense weights, the expert cache, the KV cache), and the rest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryReport {
    /// Peak resident set (`VmHWM`) over the measured work.
    pub peak_rss_bytes: u64,
    /// Largest anonymous resident set sampled (after each prompt).
    pub rss_anon_bytes: u64,
    /// Largest file-backed resident set sampled (after each prompt).
    pub rss_file_bytes: u64,
    /// Checkpoint bytes of the dense weights.
    pub dense_bytes: u64,
    /// Peak bytes of resident experts.
    pub expert_cache_bytes: u64,
    /// Largest KV cache of one sequence.
    pub kv_bytes: u64,
    /// `peak_rss_bytes − (dense + expert cache + KV)`: code, activations, allocator slack.
    pub overhead_bytes: i64,
}

impl MemoryReport {
    /// A report from a reading and the three budgeted quantities.
    pub fn new(rss: Rss, dense: u64, experts: u64, kv: u64) -> Self {
        MemoryReport {
            peak_rss_bytes: rss.peak,
            rss_anon_bytes: rss.anon,
            rss_file_bytes: rss.file,
            dense_bytes: dense,
            expert_cache_bytes: experts,
            kv_bytes: kv,
            overhead_bytes: rss.peak as i64 - (dense + experts + kv) as i64,
        }
    }

    /// `peak / (dense + expert cache + KV)`.
    pub fn ratio(&self) -> f64 {
        self.peak_rss_bytes as f64
            / (self.dense_bytes + self.expert_cache_bytes + self.kv_bytes).max(1) as f64
    }

    /// One line for a terminal: `peak 957 MB (file 423 + anon 534) = 1.02 × (dense 422 + cache 21 + KV 2) MB`.
    pub fn line(&self) -> String {
        let mb = |b: u64| b as f64 / 1e6;
        format!(
            "peak RSS {:.0} MB (file {:.0} + anon {:.0}) = {:.2} × (dense {:.0} + expert cache {:.0} + KV {:.1}) MB",
            mb(self.peak_rss_bytes),
            mb(self.rss_file_bytes),
            mb(self.rss_anon_bytes),
            self.ratio(),
            mb(self.dense_bytes),
            mb(self.expert_cache_bytes),
            mb(self.kv_bytes),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_see_an_allocation() {
        let Some(before) = Rss::now() else {
            return; // not Linux
        };
        let v: Vec<u8> = std::hint::black_box(vec![1; 64 << 20]);
        let after = Rss::now().unwrap();
        assert!(
            after.anon >= before.anon + (60 << 20),
            "{before:?} → {after:?}"
        );
        assert!(after.peak >= after.anon + after.file - (1 << 20));
        drop(v);
        let r = MemoryReport::new(after, 100, 10, 1);
        assert_eq!(r.overhead_bytes, after.peak as i64 - 111);
    }
}
