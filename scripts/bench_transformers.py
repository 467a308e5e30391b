"""The transformers side of scripts/bench-vs-pytorch.sh for real models: PyTorch + transformers
load the same GGUF that `palm bench --model` runs (transformers dequantises it to fp32 with the
gguf package), and time the same workloads, printing one JSON object per line.

Workloads: sample (batch 16, `generate` with the KV cache, temperature-1 sampling, no early
stop), decode (the same at batch 1), reward (one forward, no grad), train (forward,
cross-entropy, backward, AdamW on every parameter, as `palm bench train --model`; with
`--lora-r R`, peft's LoRA on q, k, v and o with alpha 2R over a frozen base, as
`palm bench train --lora-r R`).
"""
import argparse, json, os, resource, statistics, time

import torch


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load(path):
    from transformers import AutoModelForCausalLM
    d, f = os.path.split(os.path.abspath(path))
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    model.eval()
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workload", choices=["train", "sample", "decode", "reward"])
    ap.add_argument("--model", required=True, help="a GGUF file")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--lora-r", type=int, default=0, help="train: LoRA rank (0: full model)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = load(a.model)
    vocab = model.config.vocab_size
    if a.workload in ("sample", "decode"):
        b = 1 if a.workload == "decode" else (a.batch_size or 16)
        prompts = torch.tensor([[(i * 31 + j * 7) % 255 + 1 for j in range(16)] for i in range(b)])

        def step():
            with torch.no_grad():
                model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                               temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=a.new_tokens,
                               min_new_tokens=a.new_tokens, pad_token_id=0)
        tokens = b * a.new_tokens
    elif a.workload == "reward":
        b = a.batch_size or 16
        ids = torch.randint(0, vocab, (b, a.seq_len))

        def step():
            with torch.no_grad():
                model.model(ids).last_hidden_state.mean(1).tolist()
        tokens = b * a.seq_len
    else:
        b = a.batch_size or 8
        ids = torch.randint(0, vocab, (b, a.seq_len + 1))
        if a.lora_r:
            from peft import LoraConfig, get_peft_model
            cfg = LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
            model = get_peft_model(model, cfg)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            out = model(ids[:, :-1], labels=ids[:, :-1])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        tokens = b * a.seq_len
    step()  # warm-up
    times = []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    secs = statistics.median(times)
    print(json.dumps({"workload": a.workload, "model": a.model, "tokens_per_run": tokens,
                      "median_seconds": secs, "tokens_per_sec": tokens / secs,
                      "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(),
                      "lora_r": a.lora_r or None,
                      "all_seconds": times}))


if __name__ == "__main__":
    main()
