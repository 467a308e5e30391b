//! `palm bench WORKLOAD`: throughput of the core workloads, one JSON object per line on stdout
//! (median of several runs after a warm-up), for `scripts/bench-vs-pytorch.sh` and by hand.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use palm::ops::linear::MatmulPrecision;
use palm::rlhf::ppo::{PpoConfig, PpoTrainer};
use palm::sample::{generate, GenerateRequest, Sampling};
use palm::train::optim::{grads_take, OptimConfig, Optimizer};
use palm::{Forward, Model, Palm, PalmConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// One training step: forward, cross-entropy, backward, clipping, AdamW.
    Train,
    /// Batched rollout sampling with the KV cache (256 new tokens by default).
    Sample,
    /// Batch-1 decoding with the KV cache.
    Decode,
    /// Reward-model style scoring: one forward over full sequences, no gradient.
    Reward,
    /// One PPO iteration (LoRA actor and critic, frozen reference): rollout of `--batch-size`
    /// prompts (default 16) with `--new-tokens` (default 64 here) and one epoch of updates.
    /// Tokens are prompt + response tokens of the batch; the JSON adds the rollout and update
    /// tokens/s of the last run.
    Ppo,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    pub workload: Workload,
    /// Model size preset: tiny, small (dim 256, depth 4) or base (dim 512, depth 8).
    #[arg(long, default_value = "small")]
    pub config: String,
    /// Bench this model instead of a fresh PaLM of --config (train, sample, decode, reward):
    /// a GGUF file, a Hugging Face directory or a checkpoint.
    #[arg(long)]
    pub model: Option<std::path::PathBuf>,
    /// Batch size (default: train 8 at small / 4 at base, sample 16, decode 1, reward 16).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Sequence length for train/reward (default: 128 at small, 256 at base).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// New tokens per sequence for sample/decode (default 256) and ppo (default 64).
    #[arg(long)]
    pub new_tokens: Option<usize>,
    /// Timed runs (after one warm-up run).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// train: LoRA of this rank on q, k, v and o (alpha 2R, base frozen) instead of training
    /// every weight.
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// train: recompute each layer in the backward instead of keeping its activations
    /// (Hugging Face and GGUF models).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Matrix-product precision of the linear layers (bf16: AMX or AVX512-BF16, f32 master
    /// weights).
    #[arg(long, value_enum, default_value_t = super::Precision::F32)]
    pub precision: super::Precision,
}

/// Peak resident set size of this process in MiB (Linux; 0 elsewhere).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Forward FLOPs per token at context length `t`: 2 x (matrix parameters incl. the tied output
/// projection) + attention scores and weighted values (2 x 2 x L x H x D x t).
fn forward_flops_per_token(cfg: &PalmConfig, t: usize) -> f64 {
    let per_layer =
        cfg.dim * cfg.fused_dim() + cfg.attn_inner_dim() * cfg.dim + cfg.ff_inner_dim() * cfg.dim;
    let matrix = cfg.depth * per_layer + cfg.num_tokens * cfg.dim;
    let attn = 2 * cfg.depth * cfg.heads * cfg.dim_head * t;
    2.0 * (matrix + attn) as f64
}

/// One benchmarked workload: what a run processes, its FLOPs, and the run itself.
struct Job<'a> {
    tokens: usize,
    flops: f64,
    step: Box<dyn FnMut() -> Result<()> + 'a>,
}

/// Random token ids [b, t] below `vocab`.
fn random_ids(rng: &mut palm::rng::PalmRng, vocab: usize, b: usize, t: usize) -> Result<Tensor> {
    let v: Vec<i64> = palm::rng::uniform(rng, b * t, 0.0, vocab as f32)
        .into_iter()
        .map(|x| (x as i64).min(vocab as i64 - 1))
        .collect();
    Ok(Tensor::from_vec(v, (b, t), &super::device())?)
}

/// `b` prompts of 16 ids, deterministic, inside `vocab`.
fn bench_prompts(b: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..b)
        .map(|i| {
            (0..16)
                .map(|j| ((i * 31 + j * 7) % (vocab - 1).min(255) + 1) as u32)
                .collect()
        })
        .collect()
}

/// The LoRA scope `palm bench train --lora-r` trains.
const BENCH_SCOPE: &str = "bench";

/// One training step: forward, cross-entropy, backward, clipping, AdamW; of every weight, or of
/// the `bench` LoRA scope when the model has one (base frozen).
fn train_job<'a>(model: &'a Model, ids: Tensor, b: usize, t: usize, flops_tok: f64) -> Job<'a> {
    let lora = model.has_scope(BENCH_SCOPE);
    let params: Vec<_> = if lora {
        model
            .vars()
            .with_prefix(&format!("finetune_modules.{BENCH_SCOPE}."))
    } else {
        model
            .vars()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let mut opt = Optimizer::new(params.clone(), OptimConfig::adamw());
    // forward + backward: 3 forwards' FLOPs, or 2 with the base frozen (no weight gradients;
    // the LoRA products are a rounding error)
    let passes = if lora { 2.0 } else { 3.0 };
    Job {
        tokens: b * t,
        flops: passes * flops_tok * (b * t) as f64,
        step: Box::new(move || {
            // each block one graph node; the graph is freed with the loss
            let opts = Forward {
                fused_blocks: true,
                scope: lora.then_some(BENCH_SCOPE),
                freeze_base: lora,
                ..Default::default()
            };
            let loss = model.lm_loss(&ids, &opts)?;
            let store = model.backward(&loss)?;
            drop(loss);
            let g = grads_take(&params, store)?;
            opt.step_clipped(&g, 1e-4, 1.0)?;
            Ok(())
        }),
    }
}

/// Sampling `new_tokens` for each of `b` prompts with the KV cache.
fn sample_job(model: &Model, b: usize, new_tokens: usize, seed: u64, flops_tok: f64) -> Job<'_> {
    let req = GenerateRequest {
        prompts: bench_prompts(b, model.vocab_size()),
        max_new_tokens: new_tokens,
        eos: vec![],
        sampling: Sampling::default(),
        seed,
        scope: None,
        disable_lora: false,
    };
    Job {
        tokens: b * new_tokens,
        flops: flops_tok * (b * (16 + new_tokens)) as f64,
        step: Box::new(move || {
            generate(model, &req, |_, _| {})?;
            Ok(())
        }),
    }
}

/// Reward-model style scoring: one forward of fused blocks over full sequences, no gradient.
fn reward_job(model: &Model, ids: Tensor, b: usize, t: usize, flops_tok: f64) -> Job<'_> {
    Job {
        tokens: b * t,
        flops: flops_tok * (b * t) as f64,
        step: Box::new(move || {
            let opts = Forward {
                fused_blocks: true,
                ..Default::default()
            };
            let emb = model.embeddings(&ids, &opts, None)?;
            let _ = emb.mean(1)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            Ok(())
        }),
    }
}

/// One PPO iteration of a fresh PaLM of `cfg` (LoRA actor and critic, frozen reference); its
/// rollout and update speeds go into `speed`.
fn ppo_job<'a>(
    cfg: &PalmConfig,
    b: usize,
    new_tokens: usize,
    seed: u64,
    speed: &'a std::cell::RefCell<serde_json::Value>,
) -> Result<Job<'a>> {
    let cfg_ppo = PpoConfig {
        seed,
        steps: usize::MAX,
        batch_size: b,
        minibatch_size: (b / 2).max(1),
        epochs: 1,
        max_new_tokens: new_tokens,
        ..PpoConfig::default()
    };
    let prompts = bench_prompts(b, 256);
    let model = Model::from(Palm::new(cfg, seed, &super::device())?);
    let mut trainer = PpoTrainer::new(model, cfg_ppo)?;
    // reward: the share of bytes below 128 (any cheap deterministic score will do)
    let scorer = |_: &[Vec<u32>], r: &[Vec<u32>]| -> palm::Result<Vec<f32>> {
        Ok(r.iter()
            .map(|x| x.iter().filter(|&&t| t < 128).count() as f32 / x.len().max(1) as f32)
            .collect())
    };
    let tokens = b * (16 + new_tokens);
    Ok(Job {
        tokens,
        // rollout forward passes (policy, reference, critic) + one epoch of updates
        flops: 6.0 * forward_flops_per_token(cfg, 16 + new_tokens) * tokens as f64,
        step: Box::new(move || {
            let m = trainer.step(&prompts, None, &scorer, None)?;
            *speed.borrow_mut() = serde_json::json!({
                "rollout_tokens_per_s": m["speed/rollout_tokens_per_s"],
                "update_tokens_per_s": m["speed/update_tokens_per_s"],
            });
            Ok(())
        }),
    })
}

pub fn run(a: Args) -> Result<()> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    a.precision.apply();
    let cfg = match std::path::Path::new(&a.config).extension() {
        Some(_) => PalmConfig::load(std::path::Path::new(&a.config))?,
        None => PalmConfig::preset(&a.config)?,
    };
    let dev = super::device();
    let mut model = match &a.model {
        Some(p) => palm::load::load_model(p, &dev)?,
        None => Model::from(Palm::new(&cfg, a.seed, &dev)?),
    };
    if let Some(r) = a.lora_r {
        if a.workload != Workload::Train || r == 0 {
            bail!("--lora-r R (R >= 1) is for `palm bench train`");
        }
        let spec = palm::config::LoraSpec {
            alpha: Some(2.0 * r as f64),
            ..palm::config::LoraSpec::new(r)
        };
        model.add_scope(BENCH_SCOPE, spec, a.seed)?;
    }
    if a.gradient_checkpointing {
        if a.workload != Workload::Train {
            bail!("--gradient-checkpointing is for `palm bench train`");
        }
        model.set_gradient_checkpointing(true)?;
    }
    if a.model.is_some() && a.workload == Workload::Ppo {
        bail!("bench ppo runs a fresh PaLM of --config; --model is for train, sample, decode and reward");
    }
    let vocab = model.vocab_size();
    // forward FLOPs per token: the PaLM's own count, or 2 x parameters for other models
    let flops_per_token = |t: usize| match &model {
        Model::Palm(_) => forward_flops_per_token(&cfg, t),
        _ => 2.0 * model.num_parameters() as f64,
    };
    let big = model.dim() >= 512;
    let mut rng = palm::rng::stream(a.seed, 77);
    let new_tokens = a.new_tokens.unwrap_or(match a.workload {
        Workload::Ppo => 64,
        _ => 256,
    });
    let seq = a.seq_len.unwrap_or(if big { 256 } else { 128 });
    let ppo_speed = std::cell::RefCell::new(serde_json::Value::Null);
    let Job {
        tokens: tokens_per_run,
        flops: flops_per_run,
        mut step,
    } = match a.workload {
        Workload::Train => {
            let b = a.batch_size.unwrap_or(if big { 4 } else { 8 });
            let ids = random_ids(&mut rng, vocab, b, seq + 1)?;
            train_job(&model, ids, b, seq, flops_per_token(seq))
        }
        Workload::Sample | Workload::Decode => {
            let b = match a.workload {
                Workload::Decode => 1,
                _ => a.batch_size.unwrap_or(16),
            };
            let f = flops_per_token(16 + new_tokens / 2);
            sample_job(&model, b, new_tokens, a.seed, f)
        }
        Workload::Reward => {
            let b = a.batch_size.unwrap_or(16);
            let ids = random_ids(&mut rng, vocab, b, seq)?;
            reward_job(&model, ids, b, seq, flops_per_token(seq))
        }
        Workload::Ppo => {
            let b = a.batch_size.unwrap_or(16);
            ppo_job(&cfg, b, new_tokens, a.seed, &ppo_speed)?
        }
    };
    step()?; // warm-up
    let mut times = Vec::with_capacity(a.runs);
    for _ in 0..a.runs {
        let t0 = Instant::now();
        step()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let secs = median(times.clone());
    let out = serde_json::json!({
        "workload": format!("{:?}", a.workload).to_lowercase(),
        "config": match &a.model {
            Some(p) => p.display().to_string(),
            None => a.config.clone(),
        },
        "parameters": model.num_parameters(),
        "tokens_per_run": tokens_per_run,
        "runs": a.runs,
        "median_seconds": secs,
        "tokens_per_sec": tokens_per_run as f64 / secs,
        "gflops": flops_per_run / secs / 1e9,
        "precision": format!("{:?}", palm::ops::linear::matmul_precision()).to_lowercase(),
        // which bf16 kernel ran (null in f32)
        "lora_r": a.lora_r,
        "gradient_checkpointing": a.gradient_checkpointing,
        "bf16_kernel": palm::ops::linear::bf16_kernel()
            .filter(|_| palm::ops::linear::matmul_precision() == MatmulPrecision::Bf16),
        "peak_rss_mb": peak_rss_mb(),
        "all_seconds": times,
    });
    let mut out = out;
    if let (Some(o), serde_json::Value::Object(extra)) = (out.as_object_mut(), ppo_speed.take()) {
        o.extend(extra);
    }
    println!("{out}");
    Ok(())
}
