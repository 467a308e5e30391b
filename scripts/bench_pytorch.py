"""The PyTorch side of scripts/bench-vs-pytorch.sh: the original's PaLM (palm-rlhf-pytorch 0.8.0)
on the same configs and workloads as `palm bench`, printing one JSON object per line.

Workloads: train (forward, cross-entropy, backward, clip, AdamW), generate (the original's
`generate`, no KV cache), sample (a KV-cached sampling loop over the original's weights, written
here for fairness), decode (the cached loop at batch 1), reward (one forward, no grad).
"""
import argparse, json, math, resource, statistics, sys, time

import torch
import torch.nn.functional as F
from palm_rlhf_pytorch import PaLM
from palm_rlhf_pytorch.palm import apply_rotary_pos_emb

PRESETS = {
    "tiny": dict(num_tokens=256, dim=128, depth=2, heads=4, dim_head=32),
    "small": dict(num_tokens=256, dim=256, depth=4, heads=4, dim_head=64),
    "base": dict(num_tokens=256, dim=512, depth=8, heads=8, dim_head=64),
}


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@torch.no_grad()
def cached_sample(model, prompt, new_tokens):
    """Temperature-1 sampling with a per-layer K/V cache (multi-query: one K/V head)."""
    b, n = prompt.shape
    caches = [None] * len(model.layers)
    out = prompt
    x_ids = prompt
    offset = 0
    for _ in range(new_tokens):
        t = x_ids.shape[1]
        x = model.token_emb(x_ids)
        for li, layer in enumerate(model.layers):
            blk = layer.fn
            h = blk.norm(x)
            q, k, v, ff = blk.fused_attn_ff_proj(h).split(blk.fused_dims, dim=-1)
            q = q.view(b, t, blk.heads, -1).transpose(1, 2)
            pos = torch.arange(offset, offset + t, dtype=torch.float32)
            freqs = torch.einsum("i,j->ij", pos, blk.rotary_emb.inv_freq)
            freqs = torch.cat((freqs, freqs), dim=-1)
            power = pos / blk.rotary_emb.scale_base
            scale = blk.rotary_emb.scale ** power[:, None]
            scale = torch.cat((scale, scale), dim=-1)
            q = apply_rotary_pos_emb(freqs, q, scale)
            k = apply_rotary_pos_emb(freqs, k, scale ** -1)
            if caches[li] is not None:
                k = torch.cat((caches[li][0], k), dim=1)
                v = torch.cat((caches[li][1], v), dim=1)
            caches[li] = (k, v)
            sim = torch.einsum("bhid,bjd->bhij", q, k) * (q.shape[-1] ** -0.5)
            if t > 1:
                s = k.shape[1]
                mask = torch.ones(t, s, dtype=torch.bool).triu(s - t + 1)
                sim = sim.masked_fill(mask, -torch.finfo(sim.dtype).max)
            attn = sim.softmax(dim=-1)
            o = torch.einsum("bhij,bjd->bhid", attn, v).transpose(1, 2).reshape(b, t, -1)
            x = x + blk.attn_out(o) + blk.ff_out(ff)
        logits = model.to_logits(model.norm(x[:, -1]))
        nxt = torch.multinomial(logits.softmax(-1), 1)
        out = torch.cat((out, nxt), dim=1)
        offset += t
        x_ids = nxt
    return out[:, n:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workload", choices=["train", "generate", "sample", "decode", "reward"])
    ap.add_argument("--config", default="small")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (train)")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = PRESETS[a.config]
    big = cfg["dim"] >= 512
    model = PaLM(**cfg)
    if a.workload == "train":
        b = a.batch_size or (4 if big else 8)
        t = a.seq_len or (256 if big else 128)
        ids = torch.randint(0, 256, (b, t + 1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
                loss = model(ids, return_loss=True)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        tokens = b * t
    elif a.workload == "reward":
        b = a.batch_size or 16
        t = a.seq_len or (256 if big else 128)
        ids = torch.randint(0, 256, (b, t))
        model.eval()
        def step():
            with torch.no_grad():
                model(ids, return_only_embedding=True).mean(1).tolist()
        tokens = b * t
    else:
        b = 1 if a.workload == "decode" else (a.batch_size or 16)
        prompt = torch.randint(1, 256, (b, 16))
        model.eval()
        if a.workload == "generate":
            def step():
                model.generate(16 + a.new_tokens, prompt=prompt, temperature=1.0, filter_logits_fn=None)
        else:
            def step():
                cached_sample(model, prompt, a.new_tokens)
        tokens = b * a.new_tokens
    step()
    times = []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(json.dumps({
        "workload": a.workload, "config": a.config, "impl": "pytorch" + ("-bf16" if a.bf16 else ""),
        "tokens_per_run": tokens, "median_seconds": med, "tokens_per_sec": tokens / med,
        "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(), "all_seconds": times,
    }), flush=True)


if __name__ == "__main__":
    main()
