//! The integration tests, linked into one test binary.
//!
//! Every test module here links the whole crate (polars, candle, plotters); one binary instead of
//! one per file saves a dozen large links and their disk space, which is what bounds a clean CI
//! build on 2 cores. Run one module with `cargo test --test integration <module>::`.

mod common;
mod compute;

mod architecture;
mod bad_input;
mod bench;
mod engine_reference;
mod fuzz;
mod hybrid;
mod inspect_configs;
mod literature;
mod loader;
mod memory;
mod notebook;
mod policies_oracle;
mod quick_baseline;
mod reliability;
mod replay;
mod run_experiment;
mod sweep;
mod synth;
mod trace_import;
mod traces;
