//! moe-harness: lazy expert loading for Mixture-of-Experts LLMs, and the research harness around
//! it. One module per pipeline stage; a stage imports only the stages above it in this list
//! (`docs/ARCHITECTURE.md` draws the picture):
//!
//! 1. [`error`], [`io`], [`memory`]: typed errors naming the file, key or field; atomic writes;
//!    the process's resident memory.
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

/// Defines an option enum whose values are named by fixed strings: the same string on the command
/// line (clap `ValueEnum`), in experiment files and JSON (serde) and in every report (`Display`),
/// so an invalid value is refused at the edge and never reaches the library as a string. One
/// variant carries `#[default]`.
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $(
                $(#[$vmeta:meta])*
                $variant:ident = $text:literal
            ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize,
            serde::Deserialize, clap::ValueEnum,
        )]
        $vis enum $name {
            $(
                $(#[$vmeta])*
                #[serde(rename = $text)]
                #[value(name = $text)]
                $variant,
            )+
        }

        impl $name {
            /// The value's name in files, on the command line and in reports.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

pub mod bench;
pub mod chat;
pub mod config;
pub mod engine;
pub mod error;
pub mod experiment;
pub mod experts;
pub mod inspect;
pub mod io;
pub mod memory;
pub mod models;
pub mod report;
pub mod run;
pub mod simulate;
pub mod synth;
pub mod trace;
pub mod weights;

pub use error::{Error, Result};
