//! Training: optimisers and schedules (`optim`).

pub mod optim;
