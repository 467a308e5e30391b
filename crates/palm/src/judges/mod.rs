//! Cheap automatic text scorers, used as toy rewards and metrics (not human preference).

pub mod vader;

pub use vader::{Polarity, Vader};
