"""Independent check of a GGUF file exported by palm, with llama.cpp's `gguf` package.

Checks: GGUF version 3; `general.architecture` is llama or qwen2 with its hyperparameters; every
tensor has a llama.cpp name with the shape the hyperparameters imply (ggml order: ne0 first);
1-D tensors are F32; no tensor is missing or unexpected. With --like SRC.gguf: the same tensor
table (names and shapes), the same tokenizer.* and architecture metadata, and dequantised
weights within --tol (max |a - b| relative to max |b|) of the source's.
Exit status 0 when every check passes.
"""

import argparse
import sys

import numpy as np
from gguf import GGUFReader, GGMLQuantizationType
from gguf.quants import dequantize


def field_value(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    if not f.types:
        return None
    t = f.types[0]
    from gguf import GGUFValueType as VT

    if t == VT.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    if t == VT.ARRAY:
        sub = f.types[1] if len(f.types) > 1 else None
        if sub == VT.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    return f.parts[f.data[0]].tolist()[0]


def expected_shapes(md, arch, has_output, has_bias):
    g = lambda k: md[f"{arch}.{k}"]
    embd, n_layer, ff = g("embedding_length"), g("block_count"), g("feed_forward_length")
    heads, kv = g("attention.head_count"), g("attention.head_count_kv")
    hd = md.get(f"{arch}.attention.key_length") or embd // heads
    vocab = md.get(f"{arch}.vocab_size") or len(md.get("tokenizer.ggml.tokens") or [])
    want = {"token_embd.weight": [embd, vocab], "output_norm.weight": [embd]}
    if has_output:
        want["output.weight"] = [embd, vocab]
    for i in range(n_layer):
        p = f"blk.{i}."
        want.update({
            p + "attn_norm.weight": [embd],
            p + "ffn_norm.weight": [embd],
            p + "attn_q.weight": [embd, heads * hd],
            p + "attn_k.weight": [embd, kv * hd],
            p + "attn_v.weight": [embd, kv * hd],
            p + "attn_output.weight": [heads * hd, embd],
            p + "ffn_gate.weight": [embd, ff],
            p + "ffn_up.weight": [embd, ff],
            p + "ffn_down.weight": [ff, embd],
        })
        if has_bias:
            want.update({p + "attn_q.bias": [heads * hd], p + "attn_k.bias": [kv * hd], p + "attn_v.bias": [kv * hd]})
    return want


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--like", help="the source GGUF to compare with")
    ap.add_argument("--tol", type=float, default=0.05)
    args = ap.parse_args()
    failures = []

    def check(ok, msg):
        print(("ok   " if ok else "FAIL ") + msg)
        if not ok:
            failures.append(msg)

    r = GGUFReader(args.path)
    md = {k: field_value(r, k) for k in r.fields if not k.startswith("GGUF.")}
    version = field_value(r, "GGUF.version")
    check(version == 3, f"GGUF version {version}")
    arch = md.get("general.architecture")
    check(arch in ("llama", "qwen2"), f"general.architecture = {arch!r}")
    if arch not in ("llama", "qwen2"):
        sys.exit(1)
    for k in ["block_count", "context_length", "embedding_length", "feed_forward_length",
              "attention.head_count", "attention.head_count_kv", "rope.freq_base",
              "attention.layer_norm_rms_epsilon", "rope.dimension_count"]:
        check(f"{arch}.{k}" in md, f"{arch}.{k} = {md.get(f'{arch}.{k}')}")
    tensors = {t.name: t for t in r.tensors}
    has_bias = any(n.endswith(".bias") for n in tensors)
    want = expected_shapes(md, arch, "output.weight" in tensors, has_bias)
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    check(not missing, f"no missing tensors {missing[:5]}")
    check(not extra, f"no unexpected tensors {extra[:5]}")
    bad_shape = [(n, list(map(int, tensors[n].shape)), s) for n, s in want.items()
                 if n in tensors and list(map(int, tensors[n].shape)) != s]
    check(not bad_shape, f"all {len(want)} shapes as the hyperparameters imply {bad_shape[:3]}")
    bad_1d = [n for n, t in tensors.items() if len(t.shape) == 1 and t.tensor_type != GGMLQuantizationType.F32]
    check(not bad_1d, f"1-D tensors are F32 {bad_1d[:3]}")
    types = {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    print(f"     {len(tensors)} tensors: {types}; tokenizer keys: "
          f"{sorted(k for k in md if k.startswith('tokenizer.'))}")

    if args.like:
        s = GGUFReader(args.like)
        smd = {k: field_value(s, k) for k in s.fields if not k.startswith("GGUF.")}
        stensors = {t.name: t for t in s.tensors}
        table = lambda ts: sorted((n, list(map(int, t.shape))) for n, t in ts.items())
        check(table(tensors) == table(stensors), "same tensor names and shapes as the source")
        for k, v in smd.items():
            if k.startswith("tokenizer.") or k.startswith(f"{arch}."):
                same = md.get(k) == v or (isinstance(v, float) and abs(md.get(k, 0) - v) <= 1e-6 * abs(v))
                if not same:
                    check(False, f"metadata {k} equals the source's")
        check(all(md.get(k) is not None for k in smd if k.startswith("tokenizer.")),
              f"all {sum(k.startswith('tokenizer.') for k in smd)} tokenizer keys copied")
        worst = (0.0, None)
        for n, t in tensors.items():
            if n not in stensors:
                continue
            a = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
            st = stensors[n]
            b = dequantize(st.data, st.tensor_type).astype(np.float32).reshape(-1)
            rel = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))
            if rel > worst[0]:
                worst = (rel, n)
        check(worst[0] <= args.tol, f"dequantised weights within {args.tol} of the source "
              f"(worst max|a-b|/max|b| = {worst[0]:.3g} at {worst[1]})")

    print("PASS" if not failures else f"{len(failures)} check(s) failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
