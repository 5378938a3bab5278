//! `harness`: the command-line front of moe-harness. `main` maps `cli::run` to an exit code and
//! prints the error chain; everything else lives in the library.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    // Buffers of 1 MiB and more (experts, KV caches, activations of big layers) get pages of
    // their own that go back to the system when freed, instead of glibc's heap keeping them
    // (its default threshold grows to 32 MiB after the first frees): an evicted expert's
    // memory is memory a user gets back, and the resident set the harness reports is real.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // Below that, up to 8 MiB of free memory at the top of a thread's heap stays with it: at
    // the default 128 KiB each forward call's activations (a prompt's rows, 64 KiB and more)
    // were given back and faulted in again on the next, a page fault per 4 KiB on the compute
    // threads (1–2 % of a prompt's samples on the 2-core VM, `perf record`).
    // SAFETY: tuning calls with valid parameters, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
    }
    // candle runs its element-wise CPU ops of 64 Ki values and more on a pool of its own, one
    // thread per physical core but one, that spins after each op: a `--threads 1` run then used
    // another core (a 64-token prompt's residual adds), and a run on every core had candle's
    // spinners competing with the compute threads. One thread: those ops run inline, on the
    // engine thread, like every other tensor op of a forward call (`weights::kernels`).
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: before any other thread exists (candle reads it when its pool first starts).
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // The Parquet decoder panics on some corrupted files; the library catches those panics and
    // reports a corrupt file, so their messages are kept off the terminal. Any other panic is a
    // bug and is shown as usual.
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let in_decoder = info
            .location()
            .is_some_and(|l| l.file().contains("/polars"));
        if !in_decoder {
            default(info);
        }
    }));
    match cli::run() {
        Ok(code) => code,
        Err(e) => {
            let mut shown = e.to_string();
            eprintln!("error: {shown}");
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                // Typed errors often repeat their source in their own message: print news only.
                if !shown.contains(&c) {
                    eprintln!("  caused by: {c}");
                    shown = c;
                }
            }
            ExitCode::from(1)
        }
    }
}
