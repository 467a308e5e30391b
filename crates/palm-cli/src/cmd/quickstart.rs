use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use palm::rlhf::ppo::{CriticInit, Recipe};
use palm::rlhf::scorer::RewardModelScorer;
use palm::tasks::paths::PathsTask;
use palm::tasks::quickstart::{self as qs, QuickstartConfig};
use serde_json::json;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlgorithmChoice {
    Ppo,
    Grpo,
    DrGrpo,
    Dapo,
    Rloo,
    #[value(name = "reinforce++")]
    ReinforcePp,
    #[value(name = "reinforce++-baseline")]
    ReinforcePpBaseline,
    Dpo,
    /// Every algorithm above from the same SFT policy and reward model, one table.
    All,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecipeChoice {
    /// The standard PPO recipe (token-level KL reward, GAE, whitening, scalar critic).
    Standard,
    /// The original palm-rlhf-pytorch variant (sequence-level advantage, HL-Gauss critic).
    PalmRlhfPytorch,
    /// Both, on the same SFT model and reward model, reported side by side.
    Both,
}

/// The whole RLHF pipeline on a built-in gold-scored task (shortest paths in a random graph):
/// SFT a small PaLM (the `palm train` trainer), sample preference pairs and label them with the
/// gold scorer (with label noise), train a LoRA reward model (the `palm reward train` trainer),
/// run PPO against the LEARNED reward model, and compare gold scores before and after.
///
/// Writes DIR/summary.json and, per stage, metrics.jsonl and SVG plots (sft/, reward/, ppo*/);
/// the SFT model is DIR/sft/final, the reward model DIR/reward/reward_model.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output directory.
    #[arg(long, default_value = "quickstart")]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "standard")]
    pub recipe: RecipeChoice,
    /// The RL stage: PPO (default), a critic-free algorithm, DPO on the labelled pairs, or
    /// `all` of them on the same SFT policy and reward model with the same budget.
    #[arg(long, value_enum, default_value = "ppo")]
    pub algorithm: AlgorithmChoice,
    /// Seed for the task graph, data, init, sampling: one seed fixes the whole run.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Run the RL stage (every algorithm asked for) on this many seeds (seed, seed+1, ...) from
    /// the same SFT policy and reward model, and print each algorithm's mean gold score with its
    /// spread (one seed moves an algorithm's gain by a few hundredths). Seeds past the first
    /// write under DIR/seed-N/.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub rl_seeds: u64,
    /// A QuickstartConfig JSON file (sizes, steps, learning rates, the PPO config).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override the number of PPO steps (and of the critic-free algorithms' steps).
    #[arg(long)]
    pub ppo_steps: Option<usize>,
    /// Override the number of SFT steps.
    #[arg(long)]
    pub sft_steps: Option<usize>,
    /// Override the number of reward-model epochs (passes over the training pairs).
    #[arg(long)]
    pub rm_epochs: Option<usize>,
    /// How the standard recipe's critic starts: `reward` (default: a copy of the reward model)
    /// or `zeros`. The palm-rlhf-pytorch recipe's HL-Gauss critic always starts at zero.
    #[arg(long, value_enum)]
    pub critic_init: Option<super::ppo::CriticInitArg>,
}

fn bar(len: u64, name: &str) -> Result<ProgressBar> {
    let b = ProgressBar::new(len);
    b.set_style(ProgressStyle::with_template(&format!(
        "{name:>6} {{bar:30}} {{pos}}/{{len}} {{msg}} [{{elapsed}}<{{eta}}]"
    ))?);
    Ok(b)
}

/// `--config` (or the defaults) with the flags applied, checked.
fn quickstart_config(a: &Args) -> Result<QuickstartConfig> {
    let mut cfg: QuickstartConfig = match &a.config {
        Some(p) => palm::checkpoint::read_json(p)?,
        None => QuickstartConfig::default(),
    };
    cfg.seed = a.seed;
    cfg.ppo.seed = a.seed;
    if let Some(s) = a.ppo_steps {
        cfg.ppo.steps = s;
        cfg.online.steps = s;
    }
    if let Some(s) = a.sft_steps {
        cfg.sft_steps = s;
    }
    if let Some(s) = a.rm_epochs {
        cfg.rm_epochs = s;
    }
    if let Some(c) = a.critic_init {
        cfg.ppo.critic_init = c.into();
    }
    cfg.ppo.validate()?;
    Ok(cfg)
}

pub fn run(a: Args) -> Result<()> {
    let t_all = Instant::now();
    let dev = super::device();
    let cfg = quickstart_config(&a)?;
    let task = PathsTask::standard(a.seed)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    palm::checkpoint::write_json_atomic(&a.out.join("config.json"), &cfg)?;
    let walk = task.walk_baseline(2000, &mut palm::rng::seeded(a.seed));
    tracing::info!(
        "task: {} nodes, out-degree 3; random walks score {walk:.3} (optimal = 1)",
        task.nodes
    );

    // 1. SFT
    let t = Instant::now();
    let sft_dir = a.out.join("sft");
    let (sft, sft_summary) = qs::train_sft(&task, &cfg, &sft_dir, &dev)?;
    let sft_model = qs::sft_model_dir(&sft_dir);
    let gold_sft = qs::gold_eval(&task, &sft, None, 4, a.seed + 77)?;
    let sft_s = t.elapsed().as_secs_f64();
    tracing::info!(
        "sft: gold score {:.3}, optimal {:.3}, val loss {:?} ({sft_s:.0} s)",
        gold_sft.score,
        gold_sft.optimal_fraction,
        sft_summary.final_val_loss
    );

    // 2. preference pairs
    let t = Instant::now();
    let (train, held) = qs::make_pairs(&task, &sft, &cfg)?;
    let pairs_s = t.elapsed().as_secs_f64();
    tracing::info!(
        "pairs: {} train (label noise {}), {} held out ({pairs_s:.0} s)",
        train.len(),
        cfg.label_noise,
        held.len()
    );

    // 3. reward model
    let t = Instant::now();
    let rm_dir = a.out.join("reward");
    let b = bar(0, "reward")?;
    let (rm, rm_summary) = qs::train_rm(&sft_model, &train, &held, &cfg, &rm_dir, &dev, |s| {
        b.set_length(s.total_steps);
        b.set_position(s.step);
        b.set_message(format!("loss {:.3} acc {:.2}", s.loss, s.accuracy));
    })?;
    b.finish();
    let rm_acc = rm_summary.eval_accuracy.unwrap_or(f64::NAN);
    let rm = RewardModelScorer {
        model: rm,
        eos: Some(palm::tokenizer::BYTE_EOS),
        batch_size: 64,
    };
    let rm_s = t.elapsed().as_secs_f64();
    tracing::info!("reward model: held-out accuracy {rm_acc:.3} ({rm_s:.0} s)");

    // 4. the RL stage on the same SFT policy and reward model: PPO (each --recipe), the other
    //    algorithms --algorithm asks for; with --rl-seeds N, again on N - 1 more seeds
    let with_ppo = matches!(a.algorithm, AlgorithmChoice::Ppo | AlgorithmChoice::All);
    let stage = RlStage {
        a: &a,
        task: &task,
        sft_model: &sft_model,
        rm: &rm,
        train: &train,
        held: &held,
        dev: &dev,
    };
    let (reports, algos) = stage.run(&cfg, &a.out)?;
    let mut by_seed = vec![algos.clone()];
    for i in 1..a.rl_seeds {
        let seed = a.seed + i;
        let mut c = cfg.clone();
        (c.seed, c.ppo.seed) = (seed, seed);
        tracing::info!("rl stage, seed {seed} ({} of {})", i + 1, a.rl_seeds);
        by_seed.push(stage.run(&c, &a.out.join(format!("seed-{seed}")))?.1);
    }
    let spread = spread_over_seeds(&by_seed);

    // 5. summary
    let main = reports.first();
    let total = t_all.elapsed().as_secs_f64();
    let summary = json!({
        "task": {"name": "paths", "nodes": task.nodes, "seed": a.seed, "random_walk_score": walk},
        "gold_score_sft": gold_sft.score,
        "gold_score_ppo": main.map(|m| m.gold_score_ppo),
        "gold_optimal_fraction_sft": gold_sft.optimal_fraction,
        "gold_optimal_fraction_ppo": main.map(|m| m.gold_optimal_fraction_ppo),
        "reward_model_accuracy": rm_acc,
        "kl": main.map(|m| m.kl),
        "seconds": {"sft": sft_s, "pairs": pairs_s, "reward_model": rm_s, "ppo": main.map(|m| m.seconds), "total": total},
        "pairs": {"train": train.len(), "heldout": held.len(), "label_noise": cfg.label_noise},
        "sft": sft_summary,
        "reward_model": rm_summary,
        "recipes": reports,
        "algorithms": algos,
        "algorithms_over_seeds": spread,
        "stages": {"sft": sft_dir, "sft_model": sft_model, "reward": rm_dir,
            "reward_model": rm_dir.join(palm::rlhf::reward_train::FINAL_DIR)},
    });
    palm::checkpoint::write_json_atomic(&a.out.join("summary.json"), &summary)?;
    print_table(&summary, &reports, &algos, with_ppo, &a.out);
    if a.rl_seeds > 1 {
        print_spread(&spread, gold_sft.score);
    }
    println!("{summary}");
    Ok(())
}

/// PPO against the learned reward model, once per `--recipe`, with a progress bar each.
fn ppo_recipes(
    a: &Args,
    task: &PathsTask,
    cfg: &QuickstartConfig,
    sft_model: &std::path::Path,
    rm: &RewardModelScorer,
    dev: &candle_core::Device,
    out: &std::path::Path,
) -> Result<Vec<qs::PpoReport>> {
    let recipes = match a.recipe {
        RecipeChoice::Standard => vec![Recipe::Standard],
        RecipeChoice::PalmRlhfPytorch => vec![Recipe::PalmRlhfPytorch],
        RecipeChoice::Both => vec![Recipe::Standard, Recipe::PalmRlhfPytorch],
    };
    let mut reports = vec![];
    for r in recipes {
        let name = match r {
            Recipe::Standard => "ppo",
            Recipe::PalmRlhfPytorch => "ppo-palm-rlhf-pytorch",
        };
        let b = bar(cfg.ppo.steps as u64, "ppo")?;
        let rep = qs::run_ppo(task, sft_model, rm, r, cfg, &out.join(name), dev, |m| {
            b.set_message(format!(
                "rm {:.2} gold {:.3} kl {:.2}",
                m["objective/scores"].as_f64().unwrap_or(f64::NAN),
                m["gold/score"].as_f64().unwrap_or(f64::NAN),
                m["objective/kl"].as_f64().unwrap_or(f64::NAN)
            ));
            b.inc(1)
        })?;
        b.finish();
        tracing::info!(
            "{name}: gold score {:.3}, optimal {:.3}, KL {:.2} ({:.0} s)",
            rep.gold_score_ppo,
            rep.gold_optimal_fraction_ppo,
            rep.kl,
            rep.seconds
        );
        reports.push(rep);
    }
    Ok(reports)
}

/// Everything the RL stage runs on, fixed across seeds.
struct RlStage<'a> {
    a: &'a Args,
    task: &'a PathsTask,
    sft_model: &'a std::path::Path,
    rm: &'a RewardModelScorer,
    train: &'a [qs::Pair],
    held: &'a [qs::Pair],
    dev: &'a candle_core::Device,
}

impl RlStage<'_> {
    /// PPO (each recipe) and the other algorithms with `cfg`'s seeds, writing under `out`; the
    /// table's rows, PPO's (standard recipe) first.
    fn run(
        &self,
        cfg: &QuickstartConfig,
        out: &std::path::Path,
    ) -> Result<(Vec<qs::PpoReport>, Vec<qs::AlgorithmReport>)> {
        let a = self.a;
        let reports = match a.algorithm {
            AlgorithmChoice::Ppo | AlgorithmChoice::All => {
                ppo_recipes(a, self.task, cfg, self.sft_model, self.rm, self.dev, out)?
            }
            _ => vec![],
        };
        let mut algos = vec![];
        if let Some(rep) = reports.first() {
            let m = palm::load::load_model(&rep.dir.join("checkpoint"), self.dev)?;
            let actor = Some(palm::rlhf::rollout::ACTOR);
            let (kl, rm_score) =
                qs::policy_kl_and_rm(self.task, &m, actor, self.rm, cfg.seed + 99)?;
            algos.push(qs::AlgorithmReport {
                algorithm: "ppo".into(),
                gold_score: rep.gold_score_ppo,
                optimal_fraction: rep.gold_optimal_fraction_ppo,
                kl,
                rm_score,
                seconds: rep.seconds,
                dir: rep.dir.clone(),
            });
        }
        algos.extend(other_algorithms(
            a,
            self.task,
            cfg,
            self.sft_model,
            self.rm,
            self.train,
            self.held,
            self.dev,
            out,
        )?);
        Ok((reports, algos))
    }
}

/// One algorithm's gold score over the RL stage's seeds (`--rl-seeds`).
#[derive(Debug, Clone, serde::Serialize)]
struct SeedSpread {
    algorithm: String,
    gold_by_seed: Vec<f32>,
    gold_mean: f64,
    /// Sample standard deviation over seeds (0 with one seed).
    gold_std: f64,
    optimal_mean: f64,
    kl_mean: f64,
}

/// Per algorithm (rows in the same order on every seed), the mean and spread over seeds.
fn spread_over_seeds(by_seed: &[Vec<qs::AlgorithmReport>]) -> Vec<SeedSpread> {
    let Some(first) = by_seed.first() else {
        return vec![];
    };
    let n = by_seed.len() as f64;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / n;
    (0..first.len())
        .map(|j| {
            let rows: Vec<&qs::AlgorithmReport> = by_seed.iter().map(|s| &s[j]).collect();
            let gold: Vec<f64> = rows.iter().map(|r| f64::from(r.gold_score)).collect();
            let m = mean(&gold);
            let var = gold.iter().map(|g| (g - m).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
            SeedSpread {
                algorithm: first[j].algorithm.clone(),
                gold_by_seed: rows.iter().map(|r| r.gold_score).collect(),
                gold_mean: m,
                gold_std: var.sqrt(),
                optimal_mean: mean(
                    &rows
                        .iter()
                        .map(|r| f64::from(r.optimal_fraction))
                        .collect::<Vec<_>>(),
                ),
                kl_mean: mean(&rows.iter().map(|r| r.kl).collect::<Vec<_>>()),
            }
        })
        .collect()
}

/// The `--rl-seeds` table: mean gold (and its gain over SFT) with the spread over seeds.
fn print_spread(spread: &[SeedSpread], sft: f32) {
    let n = spread.first().map_or(0, |s| s.gold_by_seed.len());
    eprintln!();
    eprintln!("  over {n} RL seeds         gold mean   std    gain over SFT   KL mean   per seed");
    for s in spread {
        let per: Vec<String> = s.gold_by_seed.iter().map(|g| format!("{g:.3}")).collect();
        eprintln!(
            "  {:<20} {:>9.3}   {:.3}   {:>+13.3}   {:>7.2}   {}",
            s.algorithm,
            s.gold_mean,
            s.gold_std,
            s.gold_mean - f64::from(sft),
            s.kl_mean,
            per.join(" ")
        );
    }
}

/// The closing table on stderr, read from the summary that was just written (what is printed is
/// what is saved).
fn print_table(
    summary: &serde_json::Value,
    reports: &[qs::PpoReport],
    algos: &[qs::AlgorithmReport],
    with_ppo: bool,
    out: &std::path::Path,
) {
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let (gold, optimal) = (
        f(&summary["gold_score_sft"]),
        f(&summary["gold_optimal_fraction_sft"]),
    );
    let secs = &summary["seconds"];
    eprintln!();
    eprintln!(
        "palm quickstart: shortest paths, {} nodes (gold score: shortest / path length; optimal 1)",
        summary["task"]["nodes"]
    );
    eprintln!("                                 gold   optimal");
    eprintln!(
        "  random walks (the SFT data)    {:.3}",
        f(&summary["task"]["random_walk_score"])
    );
    eprintln!(
        "  SFT policy                     {gold:.3}  {optimal:.3}   ({:.0} s)",
        f(&secs["sft"])
    );
    eprintln!(
        "  reward model held-out accuracy {:.3}          ({} train pairs, label noise {}, {:.0} s)",
        f(&summary["reward_model_accuracy"]),
        summary["pairs"]["train"],
        f(&summary["pairs"]["label_noise"]) as f32,
        f(&secs["reward_model"])
    );
    for r in reports {
        eprintln!(
            "  PPO {:<18}         {:.3}  {:.3}   (KL {:.2} nats, RM score {:.2}, critic {}, {:.0} s)",
            match r.recipe {
                Recipe::Standard => "standard",
                Recipe::PalmRlhfPytorch => "palm-rlhf-pytorch",
            },
            r.gold_score_ppo,
            r.gold_optimal_fraction_ppo,
            r.kl,
            r.rm_score_final,
            match r.critic_init {
                CriticInit::Zeros => "from zeros",
                CriticInit::Reward => "from the RM",
            },
            r.seconds
        );
    }
    if algos.len() > 1 || !with_ppo {
        eprintln!();
        eprintln!("  algorithm              gold   optimal   KL (nats)   RM score   seconds");
        for r in algos {
            eprintln!(
                "  {:<20} {:>6.3}   {:>6.3}   {:>9.3}   {:>8.3}   {:>7.0}",
                r.algorithm, r.gold_score, r.optimal_fraction, r.kl, r.rm_score, r.seconds
            );
        }
        eprintln!("  (SFT: gold {gold:.3}, optimal {optimal:.3})");
    }
    eprintln!(
        "  total {:.0} s; summary in {}",
        f(&secs["total"]),
        out.join("summary.json").display()
    );
}

/// The critic-free algorithms and DPO that `--algorithm` asks for, in the table's order.
#[allow(clippy::too_many_arguments)]
fn other_algorithms(
    a: &Args,
    task: &PathsTask,
    cfg: &QuickstartConfig,
    sft_model: &std::path::Path,
    rm: &RewardModelScorer,
    train: &[qs::Pair],
    held: &[qs::Pair],
    dev: &candle_core::Device,
    out_dir: &std::path::Path,
) -> Result<Vec<qs::AlgorithmReport>> {
    use palm::rlhf::online::Algorithm;
    let (online, dpo): (Vec<Algorithm>, bool) = match a.algorithm {
        AlgorithmChoice::Ppo => (vec![], false),
        AlgorithmChoice::All => (Algorithm::ALL[..6].to_vec(), true),
        AlgorithmChoice::Dpo => (vec![], true),
        AlgorithmChoice::Grpo => (vec![Algorithm::Grpo], false),
        AlgorithmChoice::DrGrpo => (vec![Algorithm::DrGrpo], false),
        AlgorithmChoice::Dapo => (vec![Algorithm::Dapo], false),
        AlgorithmChoice::Rloo => (vec![Algorithm::Rloo], false),
        AlgorithmChoice::ReinforcePp => (vec![Algorithm::ReinforcePp], false),
        AlgorithmChoice::ReinforcePpBaseline => (vec![Algorithm::ReinforcePpBaseline], false),
    };
    let mut out = vec![];
    for alg in online {
        let b = bar(cfg.online.steps as u64, alg.name())?;
        let rep = qs::run_online(
            task,
            sft_model,
            rm,
            alg,
            cfg,
            &out_dir.join(alg.name()),
            dev,
            |m| {
                b.set_message(format!(
                    "rm {:.2} gold {:.3} kl {:.3}",
                    m["reward"].as_f64().unwrap_or(f64::NAN),
                    m["gold/score"].as_f64().unwrap_or(f64::NAN),
                    m["kl"].as_f64().unwrap_or(f64::NAN)
                ));
                b.inc(1)
            },
        )?;
        b.finish();
        tracing::info!(
            "{}: gold score {:.3}, optimal {:.3}, KL {:.2} ({:.0} s)",
            rep.algorithm,
            rep.gold_score,
            rep.optimal_fraction,
            rep.kl,
            rep.seconds
        );
        out.push(rep);
    }
    if dpo {
        let b = bar(0, "dpo")?;
        let rep = qs::run_dpo(
            task,
            sft_model,
            rm,
            train,
            held,
            cfg,
            &out_dir.join("dpo"),
            dev,
            |s, t| {
                b.set_length(t);
                b.set_position(s);
            },
        )?;
        b.finish();
        tracing::info!(
            "dpo: gold score {:.3}, optimal {:.3}, KL {:.2} ({:.0} s)",
            rep.gold_score,
            rep.optimal_fraction,
            rep.kl,
            rep.seconds
        );
        out.push(rep);
    }
    Ok(out)
}
