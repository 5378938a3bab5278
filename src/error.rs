//! Typed errors of the library. Every variant names the file, key or field it is about, so a user
//! can fix the input without reading the source; the binary prints the chain and exits non-zero.

use std::path::PathBuf;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong between a checkpoint on disk and a logit.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation on a named file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file exists but its content is malformed (bad JSON, lying safetensors header, …).
    #[error("{path}: {msg}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A configuration field is missing, mistyped or inconsistent.
    #[error("{path}: field `{field}`: {msg}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// The offending field.
        field: String,
        /// What is wrong.
        msg: String,
    },
    /// A tensor the model needs is not in any shard.
    #[error("tensor `{key}` not found in checkpoint {dir}{hint}")]
    MissingTensor {
        /// The tensor name.
        key: String,
        /// The checkpoint directory.
        dir: PathBuf,
        /// Extra context (e.g. which layout was detected).
        hint: String,
    },
    /// A tensor has a shape or dtype that disagrees with the config.
    #[error("tensor `{key}` in {path}: {msg}")]
    Tensor {
        /// The tensor name.
        key: String,
        /// The shard file holding it.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The model is dense: it has no routed experts to load lazily.
    #[error("{path}: model_type `{model_type}` is a dense model: it has no routed experts to load lazily (supported MoE model types: {supported})")]
    DenseModel {
        /// The config file.
        path: PathBuf,
        /// Its `model_type`.
        model_type: String,
        /// Supported types.
        supported: String,
    },
    /// The `model_type` is not known.
    #[error("{path}: unsupported model_type `{model_type}` (supported: {supported})")]
    UnknownModel {
        /// The config file.
        path: PathBuf,
        /// Its `model_type`.
        model_type: String,
        /// Supported types.
        supported: String,
    },
    /// A user-supplied value (CLI flag, token list, budget) is invalid.
    #[error("{0}")]
    Input(String),
    /// A stage with typed errors of its own failed (the expert cache, a trace replay): its error
    /// is kept whole as the source. The stages convert into this variant themselves, so this
    /// module depends on none of them.
    #[error(transparent)]
    Stage(Box<dyn std::error::Error + Send + Sync + 'static>),
    /// A tensor operation failed.
    #[error("tensor operation: {0}")]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// Shorthand for [`Error::Format`].
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    /// Shorthand for [`Error::Config`].
    pub fn config(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Config {
            path: path.into(),
            field: field.into(),
            msg: msg.into(),
        }
    }
}
