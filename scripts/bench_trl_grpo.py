"""The TRL side of scripts/bench-vs-trl.sh: wall seconds per GRPO optimiser step of TRL's
GRPOTrainer on CPU, on SmolLM2-135M-Instruct loaded by transformers from the same GGUF that
`palm rl --policy` reads (dequantised to fp32), with the settings `palm rl --algorithm grpo` uses:

- LoRA r=8, alpha=8 (scale 1), dropout 0, on q_proj, k_proj, v_proj, o_proj (peft);
- AdamW lr 1e-3 (constant), betas (0.9, 0.999), weight decay 0, grad-norm clip 1.0;
- one optimiser step per rollout of B prompts x G completions (per_device_train_batch_size =
  B*G, gradient_accumulation_steps 1, num_iterations 1);
- loss_type "grpo" (sequence mean of token means), beta 0.04 (k3 to the reference = the
  model with the adapter disabled), temperature 1.0, top_p 1, top_k 0, at most L new tokens,
  stopping at the chat template's end-of-turn token (the tokenizer's eos, <|im_end|>);
- level-2 arithmetic prompts ("What is 37 + 48? Put only the final number inside
  <answer></answer>.", a, b in 10..=99) as conversational user messages, binary reward: 1 if the
  text inside the last <answer>...</answer> pair is, trimmed, an integer equal to a + b.

Gradient checkpointing (on by default in TRL's configs) is turned off, and bf16 (also on by
default) too: both sides run fp32 without recomputation.

Timing: a TrainerCallback takes the time at on_step_begin and on_step_end (the span holds the
generation, reward, reference and policy forwards, backward and optimiser step; model loading
is outside it); the reported figure is the median over steps 2..S (step 1 is warm-up). Prints
one JSON line: {"framework": "trl", "seconds_per_step": ..., "steps": n, "step_seconds": [...],
"settings": {...}, "versions": {...}}. Progress and TRL's own logs go to stderr.
"""
import argparse, contextlib, json, os, random, re, statistics, sys, tempfile, time

OPEN, CLOSE = "<answer>", "</answer>"
INT_RE = re.compile(r"-?[0-9]+")


def reward_of(answer, completion):
    """palm's arithmetic verifier (crates/palm/src/tasks/arithmetic.rs `reward`)."""
    close = completion.rfind(CLOSE)
    if close < 0:
        return 0.0
    open_ = completion.rfind(OPEN, 0, close)
    if open_ < 0:
        return 0.0
    s = completion[open_ + len(OPEN):close].strip()
    if not INT_RE.fullmatch(s):
        return 0.0
    return 1.0 if int(s) == answer else 0.0


def arithmetic_reward(completions, answer, **_):
    out = []
    for c, a in zip(completions, answer):
        text = c[-1]["content"] if isinstance(c, list) else c
        out.append(reward_of(int(a), text))
    return out


def problems(n, seed):
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = r.randint(10, 99), r.randint(10, 99)
        msg = f"What is {a} + {b}? Put only the final number inside {OPEN}{CLOSE}."
        rows.append({"prompt": [{"role": "user", "content": msg}], "answer": a + b})
    return rows


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="the SmolLM2 GGUF file")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4, help="prompts per step (B)")
    ap.add_argument("--group-size", type=int, default=4, help="completions per prompt (G)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-prompts", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    # Everything but the result line goes to stderr (transformers and TRL print logs to stdout).
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        result = run(a)
    print(json.dumps(result), file=real_stdout, flush=True)


def run(a):
    if a.group_size < 2:
        sys.exit("bench_trl_grpo.py: --group-size must be at least 2 (GRPO)")

    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(a.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.set_num_threads(a.threads)
    import transformers, trl, peft, datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    transformers.logging.set_verbosity_error()
    d, f = os.path.split(os.path.abspath(a.model))
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    log(f"trl: loaded {f} in {time.perf_counter() - t0:.1f}s "
        f"(eos {tok.eos_token!r} = {tok.eos_token_id}, chat template: {tok.chat_template is not None})")
    # transformers 5 loads a GGUF through its GGUF "quantizer"; without the `kernels` package
    # (not installed here) it dequantises every weight into plain nn.Linear, but the model still
    # carries the quantizer, and Trainer then refuses to train it ("quantized with
    # QuantizationMethod.GGUF ... do not support training"). Check that the weights really are
    # dense fp32 and drop the marker.
    dense = [m for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))]
    if not dense or any(type(m) is not torch.nn.Linear or m.weight.dtype != torch.float32 for m in dense):
        sys.exit("bench_trl_grpo.py: the GGUF was not dequantised to dense fp32 nn.Linear "
                 f"(got {sorted({type(m).__name__ for m in dense})}); uninstall `kernels` from the venv")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    for m in model.modules():  # the flag _assign_is_quantized sets on every sub-model's config
        if getattr(getattr(m, "config", None), "_is_quantized", False):
            m.config._is_quantized = False
    if tok.chat_template is None:
        sys.exit("bench_trl_grpo.py: the GGUF's tokenizer has no chat template")

    rows = problems(a.train_prompts, a.seed)
    ids = tok.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    prompt_tokens = len(ids)
    log(f"trl: first prompt {len(ids)} tokens: "
        f"{tok.apply_chat_template(rows[0]['prompt'], add_generation_prompt=True, tokenize=False)!r}")
    ds = datasets.Dataset.from_list(rows)
    lora = LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.times = None, []

        def on_step_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            dt = time.perf_counter() - self.begin
            self.times.append(dt)
            log(f"trl: step {len(self.times)}/{a.steps}: {dt:.2f}s")

    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="palm-bench-trl-") as out:
        cfg = GRPOConfig(
            output_dir=out,
            use_cpu=True,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            seed=a.seed,
            max_steps=a.steps,
            per_device_train_batch_size=a.batch_size * a.group_size,
            gradient_accumulation_steps=1,
            num_generations=a.group_size,
            max_completion_length=a.max_new_tokens,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=0.04,
            loss_type="grpo",
            num_iterations=1,
            learning_rate=a.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            adam_beta1=0.9,
            adam_beta2=0.999,
            max_grad_norm=1.0,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=arithmetic_reward, args=cfg,
                              train_dataset=ds, processing_class=tok, peft_config=lora,
                              callbacks=[timer])
        t0 = time.perf_counter()
        trainer.train()
        log(f"trl: train() took {time.perf_counter() - t0:.1f}s")
        hist = [h for h in trainer.state.log_history if "loss" in h]

    timed = timer.times[1:] or timer.times
    comp_len = [h.get("completions/mean_length") for h in hist]
    return {
        "framework": "trl",
        "seconds_per_step": round(statistics.median(timed), 4),
        "steps": len(timed),
        "step_seconds": [round(t, 4) for t in timer.times],
        "mean_completion_length": [None if x is None else round(x, 2) for x in comp_len],
        "reward": [h.get("reward") for h in hist],
        "settings": {
            "steps": a.steps, "batch_size": a.batch_size, "group_size": a.group_size,
            "max_new_tokens": a.max_new_tokens, "threads": torch.get_num_threads(),
            "lora_r": 8, "lora_alpha": 8, "lr": a.lr, "beta": 0.04, "loss_type": "grpo",
            "temperature": 1.0, "dtype": "float32", "gradient_checkpointing": False,
            "model": f, "prompt_tokens_first": prompt_tokens,
        },
        "versions": {
            "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "peft": peft.__version__, "python": sys.version.split()[0],
        },
    }


if __name__ == "__main__":
    main()
