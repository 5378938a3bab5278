//! `harness`: the command-line front of moe-harness. `main` maps `cli::run` to an exit code and
//! prints the error chain; everything else lives in the library.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
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
