use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use palm::chat::Message;
use palm::pretrained::Pretrained;
use palm::sample::{generate, GenerateRequest, Sampling};
use palm::tokenizer::Tokenizer;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A GGUF file, a Hugging Face model directory, a checkpoint directory, or a weights file
    /// with config.json beside it.
    #[arg(long)]
    pub model: PathBuf,
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    /// The prompt is a user message, rendered with the model's chat template (or the default
    /// template when the model has none) and the generation prompt.
    #[arg(long)]
    pub chat: bool,
    /// With --chat: a system message before the user's.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// `bytes`, a tokenizer.json, or a llama2.c tokenizer .bin (default: the model's own: GGUF
    /// metadata, tokenizer.json, else a llama2.c `tokenizer.bin`/`tok*.bin` in the model's
    /// folder or its parent, else bytes).
    #[arg(long)]
    pub tokenizer: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Softmax temperature (0 = greedy).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Keep only the K most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability mass reaches P (nucleus sampling).
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Always take the most likely token.
    #[arg(long)]
    pub greedy: bool,
    /// Sample from this LoRA scope of the model.
    #[arg(long)]
    pub scope: Option<String>,
    /// Do not stop at the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Sample N completions (one batch) and print the one the --reward model scores highest.
    #[arg(long, default_value_t = 1, requires = "reward")]
    pub best_of: usize,
    /// Reward model directory for --best-of (or a `palm reward train` run directory).
    #[arg(long)]
    pub reward: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let pre = Pretrained::load(&a.model, a.tokenizer.as_deref(), &super::device())
        .with_context(|| format!("loading model {}", a.model.display()))?;
    let (model, tok) = (&pre.model, pre.tokenizer());
    let prompt = if a.chat {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(Message::new("system", s));
        }
        messages.push(Message::new("user", &a.prompt));
        pre.text.chat_ids(&messages)?
    } else {
        tok.encode_prompt(&a.prompt)?
    };
    if prompt.is_empty() {
        bail!("the prompt is empty: give at least one character");
    }
    let req = GenerateRequest {
        prompts: vec![prompt],
        max_new_tokens: a.max_new_tokens,
        eos: if a.ignore_eos {
            vec![]
        } else {
            pre.end_ids.clone()
        },
        sampling: Sampling {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            greedy: a.greedy,
        },
        seed: a.seed,
        scope: a.scope.clone(),
        disable_lora: false,
    };
    req.sampling.validate()?; // argument errors first, without the model's context
    if a.best_of > 1 || a.reward.is_some() {
        return best_of_n(&a, model, tok, req)
            .with_context(|| format!("generating with {}", a.model.display()));
    }
    let t0 = std::time::Instant::now();
    let g = super::stream_to_stdout(model, &req, tok)
        .with_context(|| format!("generating with {}", a.model.display()))?;
    let n = g.completions[0].len();
    tracing::info!(
        "{n} tokens in {:.2}s ({:.1} tokens/s){}",
        t0.elapsed().as_secs_f64(),
        n as f64 / t0.elapsed().as_secs_f64().max(1e-9),
        if g.ended_with_eos[0] {
            ", stopped at EOS"
        } else {
            ""
        }
    );
    Ok(())
}

/// Best-of-N (the original's `RLHFTrainer.generate`): N samples of the prompt in one batch,
/// each scored by the reward model; the best is printed.
fn best_of_n(
    a: &Args,
    model: &palm::Model,
    tok: &Tokenizer,
    mut req: GenerateRequest,
) -> Result<()> {
    let Some(rm_path) = &a.reward else {
        bail!("--best-of needs --reward RM");
    };
    if a.best_of == 0 {
        bail!("--best-of must be at least 1");
    }
    let rm = super::reward::load_reward_model(rm_path)?;
    // the reward model reads the policy's ids: they must share a vocabulary (as palm ppo checks)
    if rm.trunk.vocab_size() != model.vocab_size() {
        bail!(
            "--reward {}: the reward model's vocabulary ({}) differs from the model's ({});              train the reward model on the same base model or tokenizer",
            rm_path.display(),
            rm.trunk.vocab_size(),
            model.vocab_size()
        );
    }
    let prompt = req.prompts[0].clone();
    req.prompts = vec![prompt.clone(); a.best_of];
    let g = generate(model, &req, |_, _| {})?;
    let scores = rm.score_responses(&prompt, &g.completions, tok.eos_id(), a.best_of)?;
    let (best, score) = scores
        .iter()
        .enumerate()
        .max_by(|x, y| x.1.total_cmp(y.1))
        .map(|(i, s)| (i, *s))
        .ok_or_else(|| anyhow::anyhow!("no completion generated"))?;
    for (i, s) in scores.iter().enumerate() {
        tracing::info!("sample {i}: reward {s:.4}");
    }
    let mut ids = g.completions[best].clone();
    if ids.last().is_some_and(|t| req.eos.contains(t)) {
        ids.pop();
    }
    tracing::info!("best: sample {best} of {} (reward {score:.4})", a.best_of);
    println!("{}", tok.decode(&ids)?);
    Ok(())
}
