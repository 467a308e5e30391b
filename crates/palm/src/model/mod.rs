//! Models. `palm` is the PaLM decoder of the original.

pub mod palm;

pub use palm::{cross_entropy, Forward, Palm};
