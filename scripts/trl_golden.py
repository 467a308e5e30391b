"""Golden values of RL loss functions computed by TRL's own trainer code.

Run through scripts/trl-golden.sh (which provides a venv with torch + trl). Writes
crates/palm/tests/data/trl_golden.json.

Nothing here re-implements a loss formula. The trainer methods that hold the loss code
(DPOTrainer._compute_loss, CPOTrainer.cpo_loss, ORPOTrainer.odds_ratio_loss,
GRPOTrainer._generate_and_score_completions / _compute_loss,
RLOOTrainer._generate_and_score_completions) are called unbound with a minimal fake
`self` that carries only the attributes those methods read; the model forward, the
generation step and the reward functions are stubbed so that they hand back fixed,
seeded tensors. Per-pair / per-token values are read back from what TRL returns or from
what it passes to `accelerator.gather` (which is stubbed to record its argument and
return it unchanged, as with a single process).
"""

import argparse
import json
import math
import os
import sys
import types
import warnings
from collections import defaultdict
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import trl  # noqa: E402
from trl.trainer import dpo_trainer as dpo_mod  # noqa: E402
from trl.trainer import grpo_trainer as grpo_mod  # noqa: E402
from trl.trainer import rloo_trainer as rloo_mod  # noqa: E402
from trl.experimental.cpo import cpo_trainer as cpo_mod  # noqa: E402
from trl.experimental.orpo import orpo_trainer as orpo_mod  # noqa: E402

DTYPE = torch.float64
DEVICE = torch.device("cpu")
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "crates" / "palm" / "tests" / "data" / "trl_golden.json"


def rel(mod) -> str:
    """Path of a TRL module relative to the installed package root (for `source` notes)."""
    root = Path(trl.__file__).resolve().parent.parent
    return str(Path(mod.__file__).resolve().relative_to(root))


def q(x: torch.Tensor, step: float = 1.0 / 1024) -> torch.Tensor:
    """Round inputs to a dyadic grid so that sums of inputs are exact in f64."""
    return torch.round(x / step) * step


def tolist(x: torch.Tensor):
    return x.detach().to(torch.float64).cpu().tolist()


class FakeAccelerator:
    """Single-process accelerator: gather/reduce are the identity; gathers are recorded."""

    def __init__(self):
        self.device = DEVICE
        self.process_index = 0
        self.num_processes = 1
        self.sync_gradients = True
        self.gathered = []

    def gather(self, x):
        self.gathered.append(x.detach().clone() if torch.is_tensor(x) else x)
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


class FakeModel:
    """Stands in for a model where TRL only reads `.training` / gradient-checkpointing state."""

    def __init__(self, name, training=True):
        self.name = name
        self.training = training
        self.is_gradient_checkpointing = False


# --------------------------------------------------------------------------------------------
# DPO family
# --------------------------------------------------------------------------------------------

B = 4  # preference pairs
T_DPO = 6  # max completion tokens per sequence


def dpo_inputs():
    """Per-token log-probs of chosen/rejected completions (right padded) and reference sums."""
    g = torch.Generator().manual_seed(0)
    chosen_lengths = torch.tensor([6, 3, 5, 4])
    rejected_lengths = torch.tensor([4, 6, 2, 5])
    lengths = torch.cat([chosen_lengths, rejected_lengths])  # batch is [chosen..., rejected...]
    pos = torch.arange(T_DPO).unsqueeze(0)
    mask = (pos < lengths.unsqueeze(1)).to(DTYPE)  # [2B, T]
    per_tok = q(-(torch.rand(2 * B, T_DPO, generator=g, dtype=DTYPE) * 2.5 + 0.05)) * mask
    sums = per_tok.sum(dim=1)
    # reference sums: pair 0 equals the policy exactly (delta 0 -> sigmoid loss ln 2); others perturbed
    ref = q(sums + (torch.rand(2 * B, generator=g, dtype=DTYPE) - 0.5) * 6.0)
    ref[0] = sums[0]
    ref[B] = sums[B]
    return per_tok, mask, lengths, chosen_lengths, rejected_lengths, ref[:B], ref[B:]


def dpo_fake_self(loss_type, beta, label_smoothing):
    acc = FakeAccelerator()
    s = types.SimpleNamespace(
        model=FakeModel("policy", training=True),
        accelerator=acc,
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=1.0,
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=0.05),
    )
    return s


def run_dpo_trainer_case(loss_type, beta, label_smoothing, data, pair_indices):
    """Calls DPOTrainer._compute_loss on the pairs in `pair_indices` (batch = [chosen, rejected])."""
    per_tok, mask, lengths, _, _, ref_c, ref_r = data
    idx = torch.tensor(list(pair_indices))
    rows = torch.cat([idx, idx + B])
    n = len(idx)
    # Sequence = 1 prompt token + T_DPO completion slots. completion_mask flags completion tokens in
    # input_ids; the model's log_probs are for the shifted labels (L-1 = T_DPO positions).
    L = 1 + T_DPO
    completion_mask = torch.zeros(2 * n, L, dtype=torch.long)
    completion_mask[:, 1:] = mask[rows].long()
    attention_mask = completion_mask.clone()
    attention_mask[:, 0] = 1
    input_ids = torch.arange(2 * n * L).view(2 * n, L) % 50 + 1
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_c[idx].clone(),
        "ref_rejected_logps": ref_r[idx].clone(),
    }
    log_probs = per_tok[rows].clone().requires_grad_(True)

    def fake_model(**kwargs):
        assert kwargs.get("fused_lm_head") is True
        lab = kwargs["labels"][:, 1:]
        # the fused LM head returns 0 log-prob where labels == -100
        assert torch.equal((lab != -100).to(DTYPE), mask[rows]), "label mask mismatch"
        return types.SimpleNamespace(
            log_probs=log_probs,
            entropy=torch.zeros(2 * n, T_DPO, dtype=DTYPE),
            mean_logits=torch.zeros(2 * n, T_DPO, dtype=DTYPE),
            is_top1=torch.zeros(2 * n, T_DPO, dtype=torch.bool),
        )

    s = dpo_fake_self(loss_type, beta, label_smoothing)
    loss = dpo_mod.DPOTrainer._compute_loss(s, fake_model, inputs, return_outputs=False)
    # gathers, in order: chosen_rewards, rejected_rewards, reward_accuracies, margins, chosen_logps, rejected_logps
    g = s.accelerator.gathered
    return loss.detach(), g[0], g[1], g[4], g[5]


def dpo_trainer_case(loss_type, beta, label_smoothing, data):
    _, _, _, cl, rl, ref_c, ref_r = data
    losses, cr, rr, cps, rps = [], [], [], [], []
    for i in range(B):
        # batch of one pair: the returned loss = per_sequence_loss.mean() is that pair's loss exactly
        loss, c_rew, r_rew, c_lp, r_lp = run_dpo_trainer_case(loss_type, beta, label_smoothing, data, [i])
        losses.append(loss.item())
        cr.append(c_rew.item())
        rr.append(r_rew.item())
        cps.append(c_lp.item())
        rps.append(r_lp.item())
    # consistency: the whole batch's loss is the mean of the single-pair losses
    full_loss, full_cr, full_rr, full_c, full_r = run_dpo_trainer_case(
        loss_type, beta, label_smoothing, data, range(B)
    )
    assert abs(full_loss.item() - sum(losses) / B) < 1e-12, (loss_type, full_loss.item(), sum(losses) / B)
    assert tolist(full_cr) == cr and tolist(full_rr) == rr and tolist(full_c) == cps and tolist(full_r) == rps
    return {
        "loss_type": loss_type,
        "logps": "sum",
        "beta": beta,
        "label_smoothing": label_smoothing,
        "chosen_logps": cps,
        "rejected_logps": rps,
        "ref_chosen_logps": tolist(ref_c),
        "ref_rejected_logps": tolist(ref_r),
        "chosen_lengths": cl.tolist(),
        "rejected_lengths": rl.tolist(),
        "losses": losses,
        "chosen_rewards": cr,
        "rejected_rewards": rr,
    }


def mean_logps(data):
    per_tok, _, lengths, _, _, _, _ = data
    # length-averaged log-probs of the same completions (what CPO-simpo / ORPO take as input)
    m = per_tok.sum(dim=1) / lengths.to(DTYPE)
    return m[:B], m[B:]


def simpo_case(data, beta, gamma):
    _, _, _, cl, rl, _, _ = data
    c, r = mean_logps(data)
    s = types.SimpleNamespace(
        alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=0.0, accelerator=FakeAccelerator()
    )
    losses, cr, rr = cpo_mod.CPOTrainer.cpo_loss(s, c.clone(), r.clone())
    return {
        "loss_type": "simpo",
        "logps": "mean",
        "beta": beta,
        "label_smoothing": 0.0,
        "simpo_gamma": gamma,
        "chosen_logps": tolist(c),
        "rejected_logps": tolist(r),
        "ref_chosen_logps": [0.0] * B,
        "ref_rejected_logps": [0.0] * B,
        "chosen_lengths": cl.tolist(),
        "rejected_lengths": rl.tolist(),
        "losses": tolist(losses),
        "chosen_rewards": tolist(cr),
        "rejected_rewards": tolist(rr),
    }


def orpo_case(data, beta):
    _, _, _, cl, rl, _, _ = data
    c, r = mean_logps(data)
    s = types.SimpleNamespace(beta=beta, accelerator=FakeAccelerator())
    losses, cr, rr, _ratio, _log_odds = orpo_mod.ORPOTrainer.odds_ratio_loss(s, c.clone(), r.clone())
    return {
        "loss_type": "orpo",
        "logps": "mean",
        "beta": beta,
        "label_smoothing": 0.0,
        "chosen_logps": tolist(c),
        "rejected_logps": tolist(r),
        "ref_chosen_logps": [0.0] * B,
        "ref_rejected_logps": [0.0] * B,
        "chosen_lengths": cl.tolist(),
        "rejected_lengths": rl.tolist(),
        "losses": tolist(losses),
        "chosen_rewards": tolist(cr),
        "rejected_rewards": tolist(rr),
    }


# --------------------------------------------------------------------------------------------
# GRPO / RLOO
# --------------------------------------------------------------------------------------------

G = 4
GROUPS = 2
N = G * GROUPS
T = 5


def grpo_inputs():
    g = torch.Generator().manual_seed(1)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25, 2.0, -1.0, 0.0, 0.75], dtype=DTYPE)
    lengths = torch.tensor([5, 3, 4, 2, 5, 1, 4, 3])
    cur = q(-(torch.rand(N, T, generator=g, dtype=DTYPE) * 2.0 + 0.05))
    old = q(cur + (torch.rand(N, T, generator=g, dtype=DTYPE) * 2 - 1) * 0.4)
    ref = q(cur + (torch.rand(N, T, generator=g, dtype=DTYPE) * 2 - 1) * 0.3)
    return rewards, lengths, cur, old, ref


class LogpStub:
    """Stub for `_get_per_token_logps_and_entropies`: returns fixed tensors by which model is asked."""

    def __init__(self, cur, old, ref):
        self.cur, self.old, self.ref = cur, old, ref
        self.leaf = None
        self.calls = []

    def __call__(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        self.calls.append(model.name)
        assert logits_to_keep == T
        if model.name == "old_policy":  # the generation-time pass of the policy -> old_per_token_logps
            out = self.old.clone()
        elif model.name == "ref":
            out = self.ref.clone()
        elif model.name == "policy":  # the training-time pass -> per_token_logps (with grad)
            self.leaf = self.cur.clone().requires_grad_(True)
            out = self.leaf
        else:
            raise AssertionError(model.name)
        return out, torch.zeros(N, T, dtype=DTYPE), None


def gen_fake_self(trainer, rewards, lengths, stub, *, beta, scale_rewards=None, args=None):
    prompt_ids_list = [[7, 8, 9]] * N
    completion_ids_list = [[11 + j for j in range(int(n))] for n in lengths]
    completions = [f"c{i}" for i in range(N)]

    def _generate(prompts):
        assert len(prompts) == N
        if trainer == "grpo":
            return prompt_ids_list, completion_ids_list, None, completions, None, {}, None, [None] * N
        return prompt_ids_list, completion_ids_list, completions

    def _calculate_rewards(inputs, prompts, completions_, completion_ids_list_):
        # Stubbed reward function output (TRL's own version would build the same (N, 1) tensor, in float32).
        return rewards.clone().unsqueeze(1)

    s = types.SimpleNamespace(
        accelerator=FakeAccelerator(),
        model=FakeModel("old_policy", training=True),
        ref_model=FakeModel("ref", training=False),
        environment_factories=None,
        environments=None,
        tools=None,
        _tokenizer=types.SimpleNamespace(pad_token_id=0),
        pad_to_multiple_of=None,
        mask_truncated_completions=False,
        args=args,
        num_iterations=args.num_iterations,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        beta=beta,
        num_generations=G,
        num_generations_eval=G,
        reward_weights=torch.ones(1, dtype=torch.float32),
        reward_func_names=["fixed"],
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _logs={
            "prompt": [],
            "completion": [],
            "rewards": defaultdict(list),
            "advantages": [],
            "extra": defaultdict(list),
            "images": [],
        },
        _pending_extra_logs={},
        _pending_metrics={},
        log_multimodal=False,
        _generate=_generate,
        _calculate_rewards=_calculate_rewards,
        _get_per_token_logps_and_entropies=stub,
    )
    if trainer == "grpo":
        s.multi_objective_aggregation = args.multi_objective_aggregation
        s.scale_rewards = scale_rewards
    else:
        s.normalize_advantages = args.normalize_advantages
        s.reward_clip_range = args.reward_clip_range
    inputs = [{"prompt": f"prompt {i // G}"} for i in range(N)]
    return s, inputs


def grpo_config(**kw):
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir="/tmp/palm-trl-golden-out",
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=N,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=G,
        num_iterations=2,  # > 1: old_per_token_logps are computed and used (no detached-current shortcut)
        max_completion_length=T,
        **kw,
    )


def rloo_config(**kw):
    from trl import RLOOConfig

    return RLOOConfig(
        output_dir="/tmp/palm-trl-golden-out",
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=N,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=G,
        num_iterations=2,
        max_completion_length=T,
        **kw,
    )


def grpo_generate(scale_rewards, beta, data):
    rewards, lengths, cur, old, ref = data
    args = grpo_config(beta=beta, scale_rewards=scale_rewards)
    stub = LogpStub(cur, old, ref)
    s, inputs = gen_fake_self("grpo", rewards, lengths, stub, beta=beta, scale_rewards=scale_rewards, args=args)
    out = grpo_mod.GRPOTrainer._generate_and_score_completions(s, inputs)
    assert "old_per_token_logps" in out, "expected TRL to compute old_per_token_logps (num_iterations > 1)"
    return out, stub


def rloo_advantages(data):
    rewards, lengths, cur, old, ref = data
    args = rloo_config(beta=0.0)
    assert args.normalize_advantages is False
    stub = LogpStub(cur, old, ref)
    s, inputs = gen_fake_self("rloo", rewards, lengths, stub, beta=0.0, args=args)
    out = rloo_mod.RLOOTrainer._generate_and_score_completions(s, inputs)
    return out["advantages"]


def grpo_loss_case(loss_type, beta, epsilon_high, data, use_bias_correction_kl=False):
    rewards, lengths, cur, old, ref = data
    epsilon = 0.2
    args = grpo_config(
        beta=beta,
        scale_rewards="group",
        loss_type=loss_type,
        epsilon=epsilon,
        epsilon_high=epsilon_high,
        use_bias_correction_kl=use_bias_correction_kl,
    )
    # generation step (group-scaled advantages, old + ref logps, num_items_in_batch) through TRL's own code
    stub = LogpStub(cur, old, ref)
    s, gen_inputs = gen_fake_self("grpo", rewards, lengths, stub, beta=beta, scale_rewards="group", args=args)
    batch = grpo_mod.GRPOTrainer._generate_and_score_completions(s, gen_inputs)
    assert ("ref_per_token_logps" in batch) == (beta != 0.0)
    # training step: same fake self plus the attributes `_compute_loss` reads (mirroring GRPOTrainer.__init__)
    s.model = FakeModel("policy", training=True)
    s.loss_type = args.loss_type
    s.epsilon_low = args.epsilon
    s.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    s.importance_sampling_level = args.importance_sampling_level
    s.off_policy_mask_threshold = args.off_policy_mask_threshold
    s.top_entropy_quantile = args.top_entropy_quantile
    s.entropy_coef = args.entropy_coef
    s.use_adaptive_entropy = args.use_adaptive_entropy
    s._entropy_bonus_enabled = s.entropy_coef != 0.0 or s.use_adaptive_entropy
    s.aux_loss_enabled = False
    s.max_completion_length = args.max_completion_length
    s.current_gradient_accumulation_steps = 1
    assert not s._entropy_bonus_enabled and s.top_entropy_quantile == 1.0 and s.off_policy_mask_threshold is None
    assert s.importance_sampling_level == "token" and args.delta is None
    s._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    loss = grpo_mod.GRPOTrainer._compute_loss(s, s.model, batch)
    loss.backward()
    grad = stub.leaf.grad
    m = s._metrics["train"]
    case = {
        "loss_type": loss_type,
        "beta": beta,
        "epsilon_low": s.epsilon_low,
        "epsilon_high": s.epsilon_high,
        "max_completion_length": s.max_completion_length,
        "use_bias_correction_kl": bool(args.use_bias_correction_kl),
        "num_items_in_batch": int(batch["num_items_in_batch"].item()),
        "loss": loss.item(),
        "grad": tolist(grad),
        "clip_ratio": {
            "low_mean": m["clip_ratio/low_mean"][-1],
            "high_mean": m["clip_ratio/high_mean"][-1],
            "region_mean": m["clip_ratio/region_mean"][-1],
        },
    }
    if beta != 0.0:
        case["kl"] = m["kl"][-1]
    return case, batch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    a = ap.parse_args()
    torch.manual_seed(0)

    # ---- DPO family
    data = dpo_inputs()
    dpo = [
        dpo_trainer_case("sigmoid", 0.1, 0.0, data),
        dpo_trainer_case("ipo", 0.1, 0.0, data),
        dpo_trainer_case("robust", 0.1, 0.1, data),
        dpo_trainer_case("hinge", 0.1, 0.0, data),
        simpo_case(data, beta=2.0, gamma=0.5),
        orpo_case(data, beta=0.1),
    ]
    assert abs(dpo[0]["losses"][0] - math.log(2.0)) < 1e-15
    # sigmoid ignores label_smoothing in this TRL version? check by running it with 0.1 too.
    sig_ls = dpo_trainer_case("sigmoid", 0.1, 0.1, data)
    sigmoid_uses_ls = sig_ls["losses"] != dpo[0]["losses"]

    # ---- GRPO / RLOO
    gdata = grpo_inputs()
    rewards, lengths, cur, old, ref = gdata
    out_group, _ = grpo_generate("group", 0.04, gdata)
    out_none, _ = grpo_generate("none", 0.04, gdata)
    adv_rloo = rloo_advantages(gdata)
    mask = out_group["completion_mask"]
    assert mask.tolist() == (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long().tolist()

    losses = []
    for lt, beta, eh in [
        ("grpo", 0.04, 0.28),
        ("bnpo", 0.04, 0.28),
        ("dr_grpo", 0.04, 0.28),
        ("dapo", 0.04, 0.28),
        ("dapo", 0.0, 0.2),
    ]:
        case, batch = grpo_loss_case(lt, beta, eh, gdata)
        assert torch.equal(batch["advantages"], out_group["advantages"])
        losses.append(case)
    # TRL's default since it added the option: the per-token KL is multiplied by the (differentiable) ratio
    losses_bc = []
    for lt in ["grpo", "bnpo", "dr_grpo", "dapo"]:
        case, _ = grpo_loss_case(lt, 0.04, 0.28, gdata, use_bias_correction_kl=True)
        losses_bc.append(case)
    num_items = int(out_group["num_items_in_batch"].item())
    assert num_items == int(lengths.sum())
    clip = losses[0]["clip_ratio"]
    assert clip["low_mean"] > 0 and clip["high_mean"] > 0, clip

    grpo_file, rloo_file = rel(grpo_mod), rel(rloo_mod)
    notes = [
        f"All values computed with TRL {trl.__version__} / torch {torch.__version__} on CPU in float64 "
        "(except orpo, see below). Inputs are seeded (torch.Generator manual_seed 0 for DPO, 1 for GRPO) and "
        "rounded to multiples of 1/1024 so that sums of inputs are exact.",
        f"dpo sigmoid/ipo/robust/hinge: {rel(dpo_mod)} DPOTrainer._compute_loss called unbound with a fake self "
        "(precompute_ref_logps=True, f_divergence_type=reverse_kl, ld_alpha=None, use_weighting=False) and a fake model "
        "whose fused-LM-head output `log_probs` holds the per-token log-probs (0 at non-completion positions). "
        "chosen_logps/rejected_logps are the token sums TRL computed (read back from accelerator.gather), i.e. logps='sum'. "
        "Per-pair losses come from calling it with one pair per batch (its loss is per_sequence_loss.mean()); "
        "the 4-pair batch loss was checked to equal their mean. Rewards = beta*(logps - ref_logps) as TRL logs them.",
        "dpo pair 0 has policy == reference, so the sigmoid loss there is ln 2.",
        "dpo sigmoid: in this TRL version the 'sigmoid' loss "
        + ("DOES" if sigmoid_uses_ls else "does NOT")
        + " use label_smoothing (checked by rerunning with label_smoothing=0.1); conservative-DPO smoothing lives "
        "only in 'robust' (and exo_pair/aot).",
        "dpo ipo: TRL length-normalises: ((chosen_logratio/chosen_len - rejected_logratio/rejected_len) - 1/(2*beta))^2 "
        "where the lengths are the completion token counts (completion_mask sums); logps given are the sums.",
        "dpo robust: ((1-ls)*(-logsigmoid(beta*d)) - ls*(-logsigmoid(-beta*d))) / (1-2*ls), as in TRL.",
        f"dpo simpo: {rel(cpo_mod)} CPOTrainer.cpo_loss with loss_type='simpo', alpha=0, label_smoothing=0, "
        "beta=2.0, simpo_gamma=0.5 (CPOConfig default beta is 0.1; 2.0 chosen as in the SimPO paper). Inputs are "
        "length-averaged log-probs (logps='mean', = the DPO token sums / lengths); reference-free so ref_* are 0. "
        "Rewards = beta * mean logps.",
        f"dpo orpo: {rel(orpo_mod)} ORPOTrainer.odds_ratio_loss, beta=0.1, mean log-probs. 'losses' is TRL's first output "
        "beta*logsigmoid(log_odds) (<= 0); the ORPO trainer's total loss is nll_loss - losses.mean(), so the "
        "preference term to minimise is -losses. TRL casts the inputs to float32 (.float()), so orpo values carry "
        "float32 precision only (compare with ~1e-6 relative tolerance). Rewards = beta * mean logps.",
        f"grpo advantages: {grpo_file} GRPOTrainer._generate_and_score_completions called unbound with a fake self, "
        "stubbed _generate (prompt ids + right-padded completion ids of the given lengths), stubbed _calculate_rewards "
        "(returns the fixed rewards as a float64 (N,1) tensor, single reward function, weight 1) and stubbed "
        "_get_per_token_logps_and_entropies (returns the fixed old/ref/current per-token logps). "
        "'group' = scale_rewards='group' (per-group mean, per-group Bessel std, /(std+1e-4)); "
        "'none' = scale_rewards='none' (mean-centring only).",
        f"rloo advantages: {rloo_file} RLOOTrainer._generate_and_score_completions with the same stubs, beta=0, "
        "normalize_advantages=False (RLOOConfig default), reward_clip_range=None: reward minus the mean of the other "
        "G-1 rewards of its group.",
        "grpo losses: GRPOConfig(num_iterations=2, steps_per_generation=1, gradient_accumulation_steps=1, "
        "importance_sampling_level='token', top_entropy_quantile=1, entropy_coef=0, use_vllm=False); since "
        "gradient_accumulation_steps % (steps_per_generation*num_iterations) != 0 TRL itself computes "
        "old_per_token_logps and _compute_loss uses them (ratio = exp(logp - old_logp)). The batch fed to "
        "GRPOTrainer._compute_loss is exactly what _generate_and_score_completions returned (advantages = the 'group' "
        "ones). train mode, current_gradient_accumulation_steps=1, accelerator.num_processes=1, so: grpo = mean over "
        "sequences of masked token means; bnpo = masked token sum / mask count; dr_grpo = masked sum / (N * "
        "max_completion_length); dapo = masked sum / num_items_in_batch, where num_items_in_batch = total mask count of "
        f"this batch ({num_items}) because the generation batch is this one batch (steps_per_generation=1). KL term "
        "(beta>0) is TRL's k3 estimator exp(ref-logp)-(ref-logp)-1 added per token, times beta. In 'losses' it is run "
        "with use_bias_correction_kl=False (the GRPO-paper KL). NOTE: TRL's GRPOConfig default is "
        "use_bias_correction_kl=True, which multiplies the per-token KL by the (differentiable) ratio "
        "exp(logp - old_logp); 'losses_bias_corrected_kl' (extra key) repeats the four beta=0.04 cases with that "
        "default. 'grad' = d loss / d "
        "per_token_logps from torch autograd (zero at padded positions). per_token_logps etc. hold arbitrary "
        "(non-zero) values at padded positions; TRL masks them out.",
        "grpo clip_ratio: TRL's logged clip_ratio/low_mean, high_mean, region_mean for that call (masked token means "
        "of (ratio < 1-eps_low & A<0), (ratio > 1+eps_high & A>0), and their union; TRL computes them from float32 masks, so they are float32-rounded). 'kl' (beta>0 only) is TRL's "
        "logged masked-mean KL. 'num_items_in_batch' is an extra field.",
    ]
    result = {
        "source": {"trl_version": trl.__version__, "openrlhf": None, "notes": notes},
        "dpo": dpo,
        "grpo": {
            "group_size": G,
            "rewards": tolist(rewards),
            "advantages": {
                "group": tolist(out_group["advantages"]),
                "none": tolist(out_none["advantages"]),
                "rloo": tolist(adv_rloo),
            },
            "per_token_logps": tolist(cur),
            "old_per_token_logps": tolist(out_group["old_per_token_logps"]),
            "ref_per_token_logps": tolist(out_group["ref_per_token_logps"]),
            "completion_mask": out_group["completion_mask"].tolist(),
            "advantages_used": tolist(out_group["advantages"]),
            "losses": losses,
            "losses_bias_corrected_kl": losses_bc,
        },
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes); trl {trl.__version__}", file=sys.stderr)


if __name__ == "__main__":
    main()
