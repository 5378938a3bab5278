//! moe-harness: lazy expert loading for Mixture-of-Experts LLMs, and the research harness around
//! it. One module per pipeline stage; a stage imports only the stages above it in this list
//! (`docs/ARCHITECTURE.md` draws the picture):
//!
//! 1. [`error`], [`io`]: typed errors naming the file, key or field; atomic writes.
//! 2. [`config`]: the family-agnostic [`config::ModelSpec`] and the helpers that fill it.
//! 3. [`weights`]: safetensors shards (validated headers, byte ranges), MLX quantization, layout
//!    detection (key prefix, per-expert vs stacked experts).
//! 4. [`experts`]: where experts live on disk ([`experts::store`]) and how they reach the device
//!    ([`experts::upload`], [`experts::loader`]); budgets ([`experts::budget`]); the one access
//!    driver and step protocol ([`experts::cache`]) and the eviction policies
//!    ([`experts::policies`]).
//! 5. [`models`]: the `model_type` dispatch and one file per family, all run by one decoder that
//!    resolves routed experts through [`models::moe::ExpertAccess`].
//! 6. [`trace`]: the routing-trace row ([`trace::TraceRow`]) and its Parquet files.
//! 7. [`engine`]: the lazy-expert engine (model + store + cache + loader), recording trace rows.
//! 8. [`simulate`]: offline replay of traces through the same cache driver.
//! 9. [`synth`]: synthetic checkpoints (real shapes, random weights) and synthetic traces.
//! 10. [`experiment`], [`chat`]: experiment files (TOML) and prompt templates.
//! 11. [`report`]: summaries, tables and figures.
//! 12. [`run`], [`bench`], [`inspect`]: the runner, the speed benchmark, the compatibility report.
#![deny(missing_docs)]

pub mod bench;
pub mod chat;
pub mod config;
pub mod engine;
pub mod error;
pub mod experiment;
pub mod experts;
pub mod inspect;
pub mod io;
pub mod models;
pub mod report;
pub mod run;
pub mod simulate;
pub mod synth;
pub mod trace;
pub mod weights;

pub use error::{Error, Result};
