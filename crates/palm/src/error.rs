//! The library's one error type. Every variant says what was being done and to what.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{path}:{line}: {msg}")]
    BadLine {
        path: PathBuf,
        line: usize,
        msg: String,
    },

    /// A bad record in a Parquet file; `row` counts from 0 within the file.
    #[error("{path}:row {row}: {msg}")]
    BadRow {
        path: PathBuf,
        row: u64,
        msg: String,
    },

    #[error("{path}: not a readable checkpoint (truncated or corrupt?): {msg}")]
    Corrupt { path: PathBuf, msg: String },

    #[error("missing tensor `{name}` in {path}")]
    MissingTensor { name: String, path: PathBuf },

    #[error("tensor `{name}` in {path} has shape {found:?}, the model expects {expected:?}")]
    ShapeMismatch {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("unexpected tensor `{name}` in {path} (not a parameter of this model)")]
    UnexpectedTensor { name: String, path: PathBuf },

    #[error("invalid config: {0}")]
    Config(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("{0}")]
    Msg(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn msg(s: impl Into<String>) -> Self {
        Error::Msg(s.into())
    }
}
