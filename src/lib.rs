//! moe-harness: lazy expert loading for Mixture-of-Experts LLMs, and the research harness around
//! it. The pipeline, one module per stage: [`config`] → [`weights`] (shards, layouts,
//! quantization) → [`models`] (one file per family) → [`experts`] (store, cache, policies) →
//! [`engine`] → [`simulate`] (offline replay of traces).
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
