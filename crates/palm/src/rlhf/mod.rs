//! RLHF: the reward model, its preference data and its trainer.

pub mod preference_data;
pub mod reward;
pub mod reward_train;
