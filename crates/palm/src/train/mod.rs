//! Training: optimisers and schedules (`optim`), run logs and plots (`metrics`), data (`data`),
//! pieces every trainer shares (`run`), and the language-model trainer (`trainer`).

pub mod data;
pub mod metrics;
pub mod optim;
pub mod run;
pub mod trainer;
