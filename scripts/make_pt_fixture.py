"""Writes crates/palm/tests/data/tiny_palm.pt (a `torch.save` state_dict of the original's PaLM,
with an 'actor' LoRA scope and perturbed norms), its config.json, and the same tensors as
safetensors, so the test `torch_pickle_checkpoint_loads` can check our pickle reader against them.

    python scripts/make_pt_fixture.py        # needs torch, safetensors, palm-rlhf-pytorch==0.8.0
"""
import json, pathlib
import torch
from safetensors.torch import save_file
from palm_rlhf_pytorch import PaLM

out = pathlib.Path(__file__).resolve().parent.parent / "crates/palm/tests/data"
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
cfg = dict(num_tokens=64, dim=16, depth=1, heads=2, dim_head=8, ff_mult=2, lora_r=2)
model = PaLM(**cfg)
model.add_finetune_params("actor", lora_r=2)
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("gamma") or name.endswith(".B"):
            p.normal_(0, 0.1)
sd = model.state_dict()
torch.save(sd, out / "tiny_palm.pt")
(out / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
ids = torch.tensor([[1, 5, 9, 2, 33, 7]])
logits = model(ids, finetune_scope="actor")
save_file({"ids": ids, "logits_scoped": logits.detach().contiguous()}, out / "tiny_palm_io.safetensors")
print("wrote", out)
