"""Trains the original palm-rlhf-pytorch 0.8.0 PaLM on exactly the batches a `palm train
--export-batches` run used, from the same initial weights, with the same optimiser (AdamW, global
norm clipping, warmup + cosine schedule), and compares the validation curves.

Usage: python scripts/compare_train.py RUN_DIR   (run by scripts/compare-train.sh)
"""
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from palm_rlhf_pytorch import PaLM


def lr_at(step, max_lr, min_lr, warmup, total):
    """Same schedule as palm::train::optim::lr_at (step counts from 0)."""
    if warmup > 0 and step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total or total <= warmup:
        return max(min_lr, max_lr if total <= warmup else min_lr)
    progress = (step - warmup) / (total - warmup)
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))


def main():
    run = Path(sys.argv[1])
    mcfg = json.loads((run / "initial" / "config.json").read_text())
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    tcfg = json.loads((ckpts[-1] / "trainer.json").read_text())["config"]
    assert tcfg["lora"] is None and tcfg["optimizer"]["kind"] == "adamw"

    torch.manual_seed(0)
    model = PaLM(
        dim=mcfg["dim"], num_tokens=mcfg["num_tokens"], depth=mcfg["depth"],
        causal=mcfg["causal"], dim_head=mcfg["dim_head"], heads=mcfg["heads"],
        ff_mult=mcfg["ff_mult"], attn_dropout=mcfg["attn_dropout"],
        ff_dropout=mcfg["ff_dropout"], qk_rmsnorm=mcfg["qk_rmsnorm"],
        rotary_xpos_scale_base=mcfg["rotary_xpos_scale_base"],
        # ours ignores no label by default; the original ignores 0 unless told otherwise
        cross_entropy_ignore_index=(mcfg["cross_entropy_ignore_index"]
                                    if mcfg["cross_entropy_ignore_index"] is not None else -100),
    )
    weights = load_file(str(run / "initial" / "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected, unexpected
    # what is missing must be the tied output projection and computed buffers only
    for name in missing:
        assert name == "to_logits.weight" or name.endswith(("beta", "inv_freq", "scale", "pos_emb", "pos_emb_scale")), name
    assert model.to_logits.weight.data_ptr() == model.token_emb.weight.data_ptr()

    batches = load_file(str(run / "batches.safetensors"))
    train, val = batches["train"], batches["val"]  # [steps*K, B, T+1], [E, B, T+1]
    steps, k = tcfg["steps"], tcfg["grad_accum"]
    opt_cfg = tcfg["optimizer"]
    opt = torch.optim.AdamW(
        model.parameters(), lr=tcfg["lr"], betas=tuple(opt_cfg["betas"]),
        eps=opt_cfg["eps"], weight_decay=opt_cfg["weight_decay"],
    )

    def evaluate():
        model.eval()
        with torch.no_grad():
            losses = [model(val[i], return_loss=True).item() for i in range(val.shape[0])]
        model.train()
        return sum(losses) / len(losses)

    ours = {}
    ours_train = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        ours_train[r["step"]] = r["loss"]
        if "val_loss" in r:
            ours[r["step"]] = r["val_loss"]

    theirs = {}
    theirs_train = {}
    model.train()
    t0 = time.time()
    for step in range(steps):
        lr = lr_at(step, tcfg["lr"], tcfg["min_lr"], tcfg["warmup"], steps)
        for g in opt.param_groups:
            g["lr"] = lr
        total = 0.0
        for j in range(k):
            loss = model(train[step * k + j], return_loss=True)
            (loss / k).backward()
            total += loss.item()
        if tcfg["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg["max_grad_norm"])
        opt.step()
        opt.zero_grad()
        s = step + 1
        theirs_train[s] = total / k
        if s in ours:
            theirs[s] = evaluate()
            print(f"torch step {s}: val_loss {theirs[s]:.4f}", file=sys.stderr, flush=True)
    elapsed = time.time() - t0

    print(f"PyTorch original trained {steps} steps in {elapsed:.1f}s")
    print(f"{'step':>6} {'train ours':>11} {'train torch':>12} {'val ours':>10} {'val torch':>10} {'val diff':>9}")
    for s in sorted(ours):
        print(f"{s:>6} {ours_train[s]:>11.4f} {theirs_train[s]:>12.4f} {ours[s]:>10.4f} {theirs[s]:>10.4f} {ours[s] - theirs[s]:>+9.4f}")
    last = max(ours)
    diff = abs(ours[last] - theirs[last])
    first_train_diff = abs(ours_train[1] - theirs_train[1])
    print(f"step-1 train loss difference: {first_train_diff:.2e} nats (same weights, same batch)")
    print(f"final validation loss: ours {ours[last]:.4f}, original {theirs[last]:.4f}, |diff| {diff:.4f} nats/byte (target < 0.02)")
    sys.exit(0 if diff < 0.02 else 1)


if __name__ == "__main__":
    main()
