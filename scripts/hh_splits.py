"""Splits the shared HH-RLHF test files into a training pool and a held-out slice kept aside
(the last --holdout fraction of each file, in file order, so the split is fixed), and writes the
chosen dialogues of the training pool as chat SFT data ({"messages": [...]}).

    python3 scripts/hh_splits.py ../shared/data/preferences/hh-rlhf OUT_DIR [--holdout 0.1]

Writes OUT_DIR/train.jsonl, OUT_DIR/heldout.jsonl (HH {"chosen","rejected"} lines, as read by
`palm reward train`) and OUT_DIR/sft_messages.jsonl (the training pool's chosen dialogues as
messages, for `palm train`), and prints the counts.
"""
import argparse, gzip, json, os, re

FILES = ["harmless-base-test.jsonl.gz", "helpful-base-test.jsonl.gz",
         "helpful-rejection-sampled-test.jsonl.gz"]


def messages(dialogue):
    """"\n\nHuman: a\n\nAssistant: b ..." -> [{"role": "user", ...}, {"role": "assistant", ...}]"""
    parts = re.split(r"\n\n(Human|Assistant):", dialogue)
    if parts[0].strip():
        return None
    out = []
    for tag, text in zip(parts[1::2], parts[2::2]):
        out.append({"role": "user" if tag == "Human" else "assistant", "content": text.strip()})
    if not out or out[0]["role"] != "user" or out[-1]["role"] != "assistant":
        return None
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("hh_dir")
    ap.add_argument("out")
    ap.add_argument("--holdout", type=float, default=0.1)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    train, held = [], []
    for f in FILES:
        with gzip.open(os.path.join(a.hh_dir, f), "rt", encoding="utf-8") as fh:
            rows = [json.loads(l) for l in fh if l.strip()]
        n_held = int(len(rows) * a.holdout)
        train += rows[: len(rows) - n_held]
        held += rows[len(rows) - n_held:]
    for name, rows in [("train.jsonl", train), ("heldout.jsonl", held)]:
        with open(os.path.join(a.out, name), "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps({"chosen": r["chosen"], "rejected": r["rejected"]}) + "\n")
    n_sft = 0
    with open(os.path.join(a.out, "sft_messages.jsonl"), "w", encoding="utf-8") as fh:
        for r in train:
            m = messages(r["chosen"])
            if m:
                fh.write(json.dumps({"messages": m}) + "\n")
                n_sft += 1
    print(json.dumps({"train_pairs": len(train), "heldout_pairs": len(held), "sft_dialogues": n_sft}))


if __name__ == "__main__":
    main()
