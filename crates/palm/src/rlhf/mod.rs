//! RLHF: the scorer abstraction, rollouts, advantages, KL control, value heads and PPO.

pub mod advantage;
pub mod kl;
pub mod ppo;
pub mod rollout;
pub mod scorer;
pub mod value;
