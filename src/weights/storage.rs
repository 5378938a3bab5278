//! How expert misses reach storage, and what storage they stand for.
//!
//! - [`IoMode`]: `page-cache` (plain positioned reads, served from memory after the first touch),
//!   `direct` (reads bypass the page cache: Linux `O_DIRECT` with aligned buffers and ranges
//!   widened then trimmed, macOS `F_NOCACHE`), `cold` (`direct`, and the shards are dropped from
//!   the page cache before each cell, so the first touch of each expert is a storage read).
//! - [`DeviceModel`]: an emulated storage device (presets or explicit figures). A read completes
//!   no earlier than its model allows: `latency + bytes / bandwidth`, at most `queue_depth` reads
//!   in flight, parallel reads sharing the bandwidth ([`Emulator`]). Emulation only slows reads:
//!   a read that this machine serves later than the model would is counted as *late*, and a
//!   model faster than the machine is reported as unreachable.
//! - What the OS says was read from the device (`/proc/self/io` `read_bytes`) and what of a file
//!   sits in the page cache (`mincore`).

use std::fs::File;
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

named_enum! {
    /// How the miss path reads experts.
    pub enum IoMode {
        /// Plain positioned reads: after the first touch, the OS page cache serves them.
        #[default]
        PageCache = "page-cache",
        /// Reads bypass the page cache (`O_DIRECT` on Linux, `F_NOCACHE` on macOS).
        Direct = "direct",
        /// `direct`, and the shards are dropped from the page cache before each cell.
        Cold = "cold",
    }
}

impl IoMode {
    /// Whether reads bypass the page cache.
    pub fn direct(self) -> bool {
        self != IoMode::PageCache
    }
}

/// A `/proc/meminfo` field (`MemTotal`, `MemAvailable`) in bytes (Linux); `None` elsewhere.
pub fn meminfo_bytes(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A storage device's read behaviour, to emulate it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceModel {
    /// Sustained read bandwidth, GB/s (10⁹ bytes per second), shared by all reads in flight.
    pub read_gbps: f64,
    /// Time from a read's issue to its first byte, microseconds.
    #[serde(default = "default_latency")]
    pub latency_us: f64,
    /// Reads in flight at once; more wait for a slot.
    #[serde(default = "default_queue")]
    pub queue_depth: usize,
}

fn default_latency() -> f64 {
    80.0
}
fn default_queue() -> usize {
    8
}

/// Named devices: `(name, model, where the figures come from)`.
pub const PRESETS: &[(&str, DeviceModel, &str)] = &[
    (
        "apple-m2-ssd",
        DeviceModel {
            read_gbps: 2.7,
            latency_us: 80.0,
            queue_depth: 8,
        },
        "MacBook Air M2, 512 GB: about 2.7 GB/s sequential read in Blackmagic Disk Speed Test (reviews summarised by bytebuys.com; the 256 GB model, one NAND chip, reads 40-50 % slower per The Verge)",
    ),
    (
        "apple-m2-pro-ssd",
        DeviceModel {
            read_gbps: 5.37,
            latency_us: 80.0,
            queue_depth: 8,
        },
        "16-inch MacBook Pro M2 Pro, 2 TB: 5,372 MB/s read in Blackmagic Disk Speed Test (Macworld and Tom's Guide, reported by MacRumors, Jan 2023)",
    ),
    (
        "pcie4-nvme",
        DeviceModel {
            read_gbps: 7.45,
            latency_us: 60.0,
            queue_depth: 32,
        },
        "Samsung 990 PRO (PCIe 4.0 x4 NVMe): 7,450 MB/s sequential read (Samsung data sheet)",
    ),
    (
        "sata-ssd",
        DeviceModel {
            read_gbps: 0.56,
            latency_us: 100.0,
            queue_depth: 32,
        },
        "Samsung 870 EVO (SATA 6 Gb/s): 560 MB/s sequential read (Samsung data sheet); NCQ depth 32",
    ),
];

impl DeviceModel {
    /// A preset by name; the error lists the presets.
    pub fn preset(name: &str) -> Result<DeviceModel, String> {
        PRESETS
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, m, _)| *m)
            .ok_or_else(|| {
                format!(
                    "unknown storage device `{name}` (presets: {}; or give {{ read_gbps = …, latency_us = …, queue_depth = … }})",
                    PRESETS
                        .iter()
                        .map(|(n, _, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }

    /// Refuses figures that model nothing (zero or negative bandwidth, negative latency, a queue
    /// of zero).
    pub fn check(&self) -> Result<(), String> {
        if !(self.read_gbps.is_finite() && self.read_gbps > 0.0) {
            return Err(format!(
                "read_gbps = {} must be a positive number of GB/s",
                self.read_gbps
            ));
        }
        if !(self.latency_us.is_finite() && self.latency_us >= 0.0) {
            return Err(format!("latency_us = {} must be ≥ 0", self.latency_us));
        }
        if self.queue_depth == 0 {
            return Err("queue_depth must be at least 1".into());
        }
        Ok(())
    }

    /// Seconds one read of `bytes` takes alone: latency plus transfer.
    pub fn read_seconds(&self, bytes: u64) -> f64 {
        self.latency_us * 1e-6 + bytes as f64 / (self.read_gbps * 1e9)
    }
}

impl std::fmt::Display for DeviceModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} GB/s, {} µs, queue {}",
            self.read_gbps, self.latency_us, self.queue_depth
        )
    }
}

/// Time for the emulator: the real clock, or a fake one in tests.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Seconds since some fixed origin.
    fn now(&self) -> f64;
    /// Returns no earlier than `t`.
    fn sleep_until(&self, t: f64);
}

/// The monotonic clock of the machine.
#[derive(Debug)]
pub struct RealClock(std::time::Instant);

impl Default for RealClock {
    fn default() -> Self {
        RealClock(std::time::Instant::now())
    }
}

impl Clock for RealClock {
    fn now(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
    fn sleep_until(&self, t: f64) {
        let d = t - self.now();
        if d > 0.0 {
            std::thread::sleep(std::time::Duration::from_secs_f64(d));
        }
    }
}

/// Completion times of an emulated device: a bandwidth pipe shared by all reads, a latency per
/// read, at most `queue_depth` reads in flight.
#[derive(Debug)]
pub struct Emulator {
    model: DeviceModel,
    clock: Box<dyn Clock>,
    state: Mutex<EmuState>,
}

#[derive(Debug, Default)]
struct EmuState {
    /// When the pipe finishes the transfers scheduled so far.
    pipe_free: f64,
    /// Completion times of reads that may still be in flight.
    in_flight: Vec<f64>,
    reads: u64,
    late: u64,
    late_seconds: f64,
}

/// What the emulator saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct EmulatorStats {
    /// Reads scheduled.
    pub reads: u64,
    /// Reads this machine served after their modelled completion (the model is faster than the
    /// machine for them).
    pub late: u64,
    /// Seconds those reads were late, summed.
    pub late_seconds: f64,
}

impl Emulator {
    /// An emulator of `model` on the machine's clock.
    pub fn new(model: DeviceModel) -> Self {
        Self::with_clock(model, Box::new(RealClock::default()))
    }

    /// An emulator of `model` on `clock`.
    pub fn with_clock(model: DeviceModel, clock: Box<dyn Clock>) -> Self {
        Emulator {
            model,
            clock,
            state: Mutex::new(EmuState::default()),
        }
    }

    /// The device it emulates.
    pub fn model(&self) -> DeviceModel {
        self.model
    }

    /// Schedules a read of `bytes` issued now: returns the time it may complete.
    pub fn schedule(&self, bytes: u64) -> f64 {
        let now = self.clock.now();
        let mut s = self.state.lock().expect("emulator state");
        s.in_flight.retain(|&t| t > now);
        s.in_flight.sort_by(f64::total_cmp);
        // A queue slot: when the (n − depth + 1)-th earliest read in flight completes.
        let q = self.model.queue_depth;
        let issue = if s.in_flight.len() >= q {
            s.in_flight[s.in_flight.len() - q].max(now)
        } else {
            now
        };
        let start = (issue + self.model.latency_us * 1e-6).max(s.pipe_free);
        let done = start + bytes as f64 / (self.model.read_gbps * 1e9);
        s.pipe_free = done;
        s.in_flight.push(done);
        s.reads += 1;
        done
    }

    /// Holds a read that really finished now until its modelled completion `done`; counts it as
    /// late if it finished after.
    pub fn complete(&self, done: f64) {
        let now = self.clock.now();
        if now > done {
            let mut s = self.state.lock().expect("emulator state");
            s.late += 1;
            s.late_seconds += now - done;
        } else {
            self.clock.sleep_until(done);
        }
    }

    /// What it saw so far.
    pub fn stats(&self) -> EmulatorStats {
        let s = self.state.lock().expect("emulator state");
        EmulatorStats {
            reads: s.reads,
            late: s.late,
            late_seconds: s.late_seconds,
        }
    }
}

/// Opens `path` for reads that bypass the page cache, or says why this filesystem refuses.
pub fn open_direct(path: &Path) -> std::io::Result<File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
    }
    #[cfg(target_os = "macos")]
    {
        use std::os::fd::AsRawFd;
        let f = File::open(path)?;
        // SAFETY: F_NOCACHE on a valid descriptor we own.
        if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_NOCACHE, 1) } == -1 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(f)
    }
    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    {
        let _ = path;
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "reads that bypass the page cache are implemented for Linux and macOS only",
        ))
    }
}

/// Alignment of direct reads (offset, length and buffer address).
pub const DIRECT_ALIGN: usize = 4096;

/// A heap buffer aligned for direct reads.
struct Aligned {
    ptr: *mut u8,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len.max(DIRECT_ALIGN), DIRECT_ALIGN)
            .expect("valid layout");
        // SAFETY: non-zero size; checked for null below.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Aligned {
            ptr,
            len: len.max(DIRECT_ALIGN),
        }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` owns `len` bytes (allocated above); u8 needs no initialisation for the
        // kernel to write into it, and we only read what a read wrote.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let layout =
            std::alloc::Layout::from_size_align(self.len, DIRECT_ALIGN).expect("valid layout");
        // SAFETY: allocated with this layout in `new`.
        unsafe { std::alloc::dealloc(self.ptr, layout) }
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Option<Aligned>> = const { std::cell::RefCell::new(None) };
}

/// Reads `buf.len()` bytes at `offset` of a file opened by [`open_direct`]: the range is widened
/// to the alignment, read into an aligned buffer, and trimmed into `buf`. A short read before
/// the end of the range is an error.
pub fn read_direct(file: &File, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    if cfg!(not(target_os = "linux")) {
        // macOS F_NOCACHE needs no alignment.
        return file.read_exact_at(buf, offset);
    }
    let a = DIRECT_ALIGN as u64;
    let start = offset / a * a;
    let end = (offset + buf.len() as u64).div_ceil(a) * a;
    let span = (end - start) as usize;
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.as_ref().is_none_or(|b| b.len < span) {
            *s = Some(Aligned::new(span.next_power_of_two()));
        }
        let scratch = &mut s.as_mut().expect("allocated").as_mut()[..span];
        let need = (offset - start) as usize + buf.len();
        let mut got = 0;
        while got < need {
            // The tail of the file may end before `end`: a short read there is fine as long as
            // the requested bytes arrived.
            let n = file.read_at(&mut scratch[got..], start + got as u64)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "file ends inside the requested range",
                ));
            }
            got += n;
            if got % DIRECT_ALIGN != 0 {
                break;
            }
        }
        if got < need {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "file ends inside the requested range",
            ));
        }
        let lo = (offset - start) as usize;
        buf.copy_from_slice(&scratch[lo..lo + buf.len()]);
        Ok(())
    })
}

/// Drops a file's pages from the page cache (`posix_fadvise(DONTNEED)`; pages some process maps
/// stay). False where the OS cannot.
pub fn drop_from_page_cache(file: &File) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid descriptor we own; advice only.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = file;
        false
    }
}

/// Bytes of the mapped range that are in the page cache now (`mincore`).
pub fn resident_bytes(map: &[u8]) -> Option<u64> {
    #[cfg(unix)]
    {
        if map.is_empty() {
            return Some(0);
        }
        const PAGE: usize = 4096;
        let pages = map.len().div_ceil(PAGE);
        let mut vec = vec![0u8; pages];
        // SAFETY: `map` is a mapping from its start (mmap returns page-aligned addresses) and
        // `vec` has one byte per page.
        let r = unsafe {
            libc::mincore(
                map.as_ptr() as *mut libc::c_void,
                map.len(),
                vec.as_mut_ptr() as *mut _,
            )
        };
        (r == 0).then(|| vec.iter().filter(|&&v| v & 1 != 0).count() as u64 * PAGE as u64)
    }
    #[cfg(not(unix))]
    {
        let _ = map;
        None
    }
}

/// Bytes this process has caused to be read from storage so far (`/proc/self/io` `read_bytes`:
/// page-cache misses and direct reads, all threads); `None` where the OS does not say.
pub fn device_read_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/io").ok()?;
    let line = text.lines().find(|l| l.starts_with("read_bytes:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    #[cfg(target_os = "linux")]
    #[test]
    fn meminfo_fields_parse_and_a_prefix_is_not_a_field() {
        let total = meminfo_bytes("MemTotal").expect("MemTotal on Linux");
        let avail = meminfo_bytes("MemAvailable").expect("MemAvailable on Linux");
        assert!(total >= avail && avail > 0, "{total} {avail}");
        // `Mem` prefixes both fields but is neither.
        assert_eq!(meminfo_bytes("Mem"), None);
    }

    /// A clock that only moves when told to (or when something sleeps on it).
    #[derive(Debug, Default, Clone)]
    struct Fake(Arc<AtomicU64>);
    impl Fake {
        fn set(&self, t: f64) {
            self.0.store(t.to_bits(), Ordering::SeqCst);
        }
    }
    impl Clock for Fake {
        fn now(&self) -> f64 {
            f64::from_bits(self.0.load(Ordering::SeqCst))
        }
        fn sleep_until(&self, t: f64) {
            if t > self.now() {
                self.set(t);
            }
        }
    }

    #[test]
    fn an_emulated_read_never_completes_before_its_model() {
        let m = DeviceModel {
            read_gbps: 1.0,
            latency_us: 100.0,
            queue_depth: 2,
        };
        let clock = Fake::default();
        let e = Emulator::with_clock(m, Box::new(clock.clone()));
        // One 1 MB read alone: 100 µs + 1 ms.
        let d = e.schedule(1_000_000);
        assert!((d - 0.0011).abs() < 1e-12, "{d}");
        e.complete(d);
        assert_eq!(clock.now(), d);
        // Three reads at once share the pipe: transfers back to back, and the third waits for a
        // queue slot (depth 2) before its latency starts.
        let t0 = clock.now();
        let a = e.schedule(1_000_000);
        let b = e.schedule(1_000_000);
        let c = e.schedule(1_000_000);
        assert!((a - (t0 + 1e-4 + 1e-3)).abs() < 1e-12);
        assert!((b - (a + 1e-3)).abs() < 1e-12, "shared bandwidth");
        assert!(c >= a + 1e-4 + 1e-3 - 1e-12, "a queue slot frees at {a}");
        assert!(c >= b + 1e-3 - 1e-12);
        // Whatever the machine does, no read completes before its modelled time.
        for &(issue_gap, bytes) in &[(0.0, 10u64), (1e-6, 5_000_000), (0.5, 1)] {
            clock.set(clock.now() + issue_gap);
            let now = clock.now();
            let d = e.schedule(bytes);
            assert!(d >= now + m.read_seconds(bytes) - 1e-12);
            e.complete(d);
            assert!(clock.now() >= d);
        }
        // A read the machine served later than the model is counted, not hidden.
        let d = e.schedule(1);
        clock.set(d + 0.25);
        e.complete(d);
        let s = e.stats();
        assert_eq!(s.late, 1);
        assert!((s.late_seconds - 0.25).abs() < 1e-9);
    }

    #[test]
    fn presets_and_bad_figures() {
        assert_eq!(DeviceModel::preset("sata-ssd").unwrap().read_gbps, 0.56);
        let e = DeviceModel::preset("floppy").unwrap_err();
        assert!(e.contains("pcie4-nvme") && e.contains("floppy"), "{e}");
        for bad in [
            DeviceModel {
                read_gbps: 0.0,
                latency_us: 1.0,
                queue_depth: 1,
            },
            DeviceModel {
                read_gbps: -2.0,
                latency_us: 1.0,
                queue_depth: 1,
            },
            DeviceModel {
                read_gbps: 1.0,
                latency_us: 1.0,
                queue_depth: 0,
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn direct_reads_return_the_bytes_of_a_plain_read() {
        let d = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let p = d.path().join("f.bin");
        let data: Vec<u8> = (0..3 * 4096 + 777).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let f = match open_direct(&p) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("direct reads unavailable here: {e}");
                return;
            }
        };
        for (off, len) in [
            (0usize, 10usize),
            (4095, 2),
            (100, 8000),
            (12000, 1065),
            (0, data.len()),
        ] {
            let mut buf = vec![0u8; len];
            read_direct(&f, off as u64, &mut buf).unwrap();
            assert_eq!(buf, data[off..off + len], "{off}+{len}");
        }
        let mut buf = vec![0u8; 100];
        assert!(read_direct(&f, data.len() as u64 - 50, &mut buf).is_err());
    }
}
