//! The reward model against palm-rlhf-pytorch 0.8.0's `RewardModel` (reference case
//! `reward_model`): masked-mean pooling, scalar and binned heads, LoRA on/off, MSE and
//! cross-entropy losses. The trunk is non-causal; padding ids are -1.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use palm::load::palm_from_tensors;
use palm::model::Model;
use palm::params::read_tensors;
use palm::rlhf::reward::{
    binned_cross_entropy, mse_loss, HeadKind, Pooling, RewardBatch, RewardConfig, RewardForward,
    RewardModel,
};
use palm::PalmConfig;

mod common;
use common::{assert_close as close, Case as Fixture};

fn fixture() -> Option<Fixture> {
    common::case("reward_model")
}

impl Fixture {
    /// The original's RewardModel: trunk `palm.*`, head and segment embeddings by name.
    fn model(&self, head: HeadKind) -> RewardModel {
        let mut all = read_tensors(&self.dir.join("weights.safetensors"), &Device::Cpu).unwrap();
        if matches!(head, HeadKind::Binned { .. }) {
            all.remove("to_pred.0.weight");
            let binned = read_tensors(
                &self.dir.join("weights_binned_head.safetensors"),
                &Device::Cpu,
            )
            .unwrap();
            all.extend(binned);
        }
        let trunk: BTreeMap<String, Tensor> = all
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("palm.")?.to_string(), v.clone())))
            .collect();
        let cfg: PalmConfig = serde_json::from_value(self.manifest["palm_config"].clone()).unwrap();
        let palm = palm_from_tensors(cfg, &trunk, &self.dir, &Device::Cpu).unwrap();
        let rm = RewardModel::new(
            Model::Palm(palm),
            RewardConfig {
                pooling: Pooling::MaskedMean,
                head,
                ..Default::default()
            },
            None,
            0,
        )
        .unwrap();
        rm.load_head(&all, &self.dir).unwrap();
        rm
    }
    fn batch(&self) -> RewardBatch {
        RewardBatch::from_tensors(
            &self.io["tokens"],
            &self.io["mask"],
            Some(&self.io["prompt_mask"]),
        )
        .unwrap()
    }
}

#[test]
fn scalar_reward_model_matches_the_original() {
    let Some(f) = fixture() else { return };
    let rm = f.model(HeadKind::Scalar);
    let batch = f.batch();
    let tol = f.tol("reward_outputs");
    let out = rm.forward(&batch, RewardForward::default()).unwrap();
    close(
        "scalar.pooled",
        &out.pooled,
        &f.io["scalar.pooled"],
        f.tol("pooled"),
    );
    close("scalar.rewards", &out.head, &f.io["scalar.rewards"], tol);
    let r = rm.rewards(&batch, RewardForward::default(), None).unwrap();
    close(
        "scalar.rewards (rewards())",
        &r,
        &f.io["scalar.rewards"],
        tol,
    );
    let nomask = RewardForward {
        pool_all: true,
        ..Default::default()
    };
    let r = rm.forward(&batch, nomask).unwrap().head;
    close(
        "scalar.rewards_nomask",
        &r,
        &f.io["scalar.rewards_nomask"],
        tol,
    );
    let off = RewardForward {
        disable_lora: true,
        ..Default::default()
    };
    let r = rm.forward(&batch, off).unwrap().head;
    close(
        "scalar.rewards_disable_lora",
        &r,
        &f.io["scalar.rewards_disable_lora"],
        tol,
    );
    let loss = mse_loss(&out.head, &f.io["scalar.labels"]).unwrap();
    close("scalar.loss", &loss, &f.io["scalar.loss"], f.tol("loss"));
}

#[test]
fn binned_reward_model_matches_the_original() {
    let Some(f) = fixture() else { return };
    let rm = f.model(HeadKind::binned(5));
    let batch = f.batch();
    let tol = f.tol("reward_outputs");
    let out = rm.forward(&batch, RewardForward::default()).unwrap();
    close(
        "binned.pooled",
        &out.pooled,
        &f.io["binned.pooled"],
        f.tol("pooled"),
    );
    close(
        "binned.bin_logits",
        &out.head,
        &f.io["binned.bin_logits"],
        tol,
    );
    let nomask = RewardForward {
        pool_all: true,
        ..Default::default()
    };
    let l = rm.forward(&batch, nomask).unwrap().head;
    close(
        "binned.bin_logits_nomask",
        &l,
        &f.io["binned.bin_logits_nomask"],
        tol,
    );
    let off = RewardForward {
        disable_lora: true,
        ..Default::default()
    };
    let l = rm.forward(&batch, off).unwrap().head;
    close(
        "binned.bin_logits_disable_lora",
        &l,
        &f.io["binned.bin_logits_disable_lora"],
        tol,
    );
    let loss = binned_cross_entropy(&out.head, &f.io["binned.labels"]).unwrap();
    close("binned.loss", &loss, &f.io["binned.loss"], f.tol("loss"));
}
