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

/// Writes `model` to `dir` as a plain model: a copy (written and read back, so the trained
/// model is untouched) with the LoRA scopes `remove` dropped and the scope `merge` merged into
/// the base weights. PPO, the online trainer and DPO export their policies with it.
pub fn export_merged(
    model: &crate::model::Model,
    remove: &[&str],
    merge: &str,
    dir: &std::path::Path,
) -> crate::error::Result<()> {
    let tmp = crate::checkpoint::temp_path(dir);
    model.save(&tmp)?;
    let copy = crate::load::load_model(&tmp, model.device());
    let _ = std::fs::remove_dir_all(&tmp);
    let mut m = copy?;
    for s in remove {
        m.remove_scope(s)?;
    }
    m.merge_scope(merge)?;
    m.save(dir)
}
