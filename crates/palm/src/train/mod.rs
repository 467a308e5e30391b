//! Training: optimisers and schedules (`optim`), run logs and plots (`metrics`).

pub mod metrics;
pub mod optim;
pub mod data;
