//! RLHF: the reward model, its preference data and trainer; PPO prompts; the scorer abstraction, rollouts,
//! advantages, KL control, value heads and PPO.

pub mod advantage;
pub mod dpo;
pub mod grpo;
pub mod kl;
pub mod online;
pub mod policy_loss;
pub mod ppo;
pub mod preference_data;
pub mod prompts;
pub mod reinforce;
pub mod reward;
pub mod reward_train;
pub mod rloo;
pub mod rollout;
pub mod scorer;
pub mod value;
