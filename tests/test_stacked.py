"""Stacked training (train/stacked.py): each member's trajectory is the same run's trained alone by
the real `Trainer.train_step`, in float64 on the CPU, step by step; clipping is per member; a
member whose loss goes non-finite is frozen without touching the others; refused options say so."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_run
from stabilab.config import RuntimeConfig, load_run_config
from stabilab.errors import UserError
from stabilab.train import Trainer
from stabilab.train.stacked import StackedTrainer

K = 20  # steps compared
# per step, relative to 1 + |value|. The LRs stay at or below 3e-2: at 0.1-0.3 this tiny model is
# chaotic, a 1e-15 relative change of its initial weights alone grows to 1e-6 .. 1e-1 in 20 steps,
# so no two float64 computations of it (batched or not) could agree to 1e-10 there.
TOL = 1e-10
CPU = RuntimeConfig(device="cpu", compile=False)

# the OEC code's model family (oec.yaml) with the cheap loss methods and independent weight decay
OEC = {"model": {"tie_embeddings": False, "norm": "layernorm", "qk_norm": "layernorm", "position": "rope",
                 "rope_fraction": 0.5, "mlp": "swiglu", "init": "oec", "logit_softcap": 30.0},
       "loss": {"z_loss": 1e-4, "mu_loss": 1e-4},
       "optim": {"weight_decay_mode": "independent", "weight_decay": 1e-4},
       "train": {"grad_accum": 2}}


pytestmark = pytest.mark.usefixtures("float64_default")  # conftest: float64 tensors, one thread


def member(shards: str, lr: float, seed: int, **sections):
    base = {"model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "block_size": 16},
            "train": {"steps": 30, "batch_size": 4}, "optim": {"warmup_steps": 5}}
    run = tiny_run(shards, seed=seed, **base)
    for name, section in sections.items():
        run[name] = {**run.get(name, {}), **section}
    run["optim"] = {**run["optim"], "lr": lr}
    return load_run_config(run)


def alone(cfg, folder, steps: int = K) -> list[dict]:
    """The run trained alone by Trainer.train_step: per step its loss, grad norm and weights."""
    tr = Trainer(cfg, folder, CPU)
    assert next(tr.model.parameters()).dtype == torch.float64
    out = []
    for _ in range(steps):
        grad_norm = tr.train_step(False)["grad_norm"]
        s = tr.stats
        out.append({"loss": (s.loss_sum / s.loss_n).item(), "grad_norm": grad_norm.item(),
                    "weights": {k: v.clone() for k, v in tr.model.state_dict().items()}})
        s.loss_sum.zero_()
        s.loss_n = 0
    return out


def stacked(cfgs, steps: int = K) -> tuple[StackedTrainer, list[list[dict]]]:
    """The members trained together: per member, per step the same record as `alone`."""
    tr = StackedTrainer(cfgs, CPU)
    out: list[list[dict]] = [[] for _ in cfgs]
    for _ in range(steps):
        rec = tr.train_step()
        for i in range(len(cfgs)):
            out[i].append({"loss": rec["train_loss"][i].item(), "grad_norm": rec["grad_norm"][i].item(),
                           "weights": {k: v.clone() for k, v in tr.member_state_dict(i).items()}})
    return tr, out


def deviation(a: dict, b: dict) -> float:
    """Largest relative difference between two step records (loss and every weight). The grad norms
    (which clipping depends on, so the weights check them at 1e-10) are compared at float32's
    resolution: `Trainer.train_step` reports its norm in float32."""
    def rel(x, y):
        if x.dtype == torch.bool:  # model.mask_unseen_tokens' vocab_mask: equal or not
            return 0.0 if torch.equal(x, y) else math.inf
        return (x - y).abs().max().item() / (1 + y.abs().max().item())

    norm = abs(a["grad_norm"] - b["grad_norm"]) / (1 + abs(b["grad_norm"]))
    assert norm <= 1e-6 or not math.isfinite(b["grad_norm"]), (a["grad_norm"], b["grad_norm"])
    assert a["weights"].keys() == b["weights"].keys()
    d = abs(a["loss"] - b["loss"]) / (1 + abs(b["loss"]))
    return max(d, *(rel(a["weights"][k], b["weights"][k]) for k in b["weights"]))


MLRA = {"model": {"mlra": {"enabled": True, "targets": ["q", "k", "v", "o"]}, "head_fp32": True, "norm": "rmsnorm"},
        "optim": {"grad_clip": None}}


# model.mask_unseen_tokens: 250 of the tiny BPE's 300 ids (its unused bytes) never occur in train.bin
MASKED = {**OEC, "model": {**OEC["model"], "mask_unseen_tokens": True}}


@pytest.mark.parametrize("options", [{}, OEC, MLRA, MASKED],
                         ids=["gpt2", "oec_family", "mlra_fp32_head_rmsnorm", "oec_family_mask_unseen"])
def test_each_member_trains_as_it_would_alone(tiny_data, tmp_path, options):
    lrs, seeds = [3e-3, 1e-2, 3e-2], [0, 1, 2]
    cfgs = [member(tiny_data["shards"], lr, seed, **options) for lr, seed in zip(lrs, seeds)]
    tr, together = stacked(cfgs)
    if options is MASKED:  # the members' mask is the one a run alone sets
        assert int((~tr.member_state_dict(0)["vocab_mask"][:300]).sum()) == 250
    worst = 0.0
    for i, cfg in enumerate(cfgs):
        single = alone(cfg, tmp_path / f"m{i}")
        for step, (a, b) in enumerate(zip(together[i], single)):
            d = deviation(a, b)
            assert d <= TOL, (i, step, d)
            worst = max(worst, d)
        assert single[-1]["loss"] < single[0]["loss"] - 0.5  # it trained (the comparison is not of two idle runs)
    print(f"worst relative deviation over {K} steps: {worst:.1e}")
    # the members differ from each other: the comparison tells them apart
    w0, w1 = together[0][-1]["weights"], together[1][-1]["weights"]
    assert all((w0[k] - w1[k]).abs().max() > 1e-3 for k in w0 if w0[k].dim() >= 2)
    assert tr.diverged_step == [None, None, None]


def test_clipping_is_per_member(tiny_data, tmp_path):
    """Clip 1.6: the larger-LR member's gradient norm exceeds it on some steps (28 at step 9), the
    small-LR member's never does (at most 1.52); both still equal their runs alone (one shared norm
    would clip both members or neither)."""
    clip = 1.6
    cfgs = [member(tiny_data["shards"], lr, 0, optim={"grad_clip": clip}) for lr in (3e-2, 1e-3)]
    _, together = stacked(cfgs)
    big, small = ([r["grad_norm"] for r in m] for m in together)
    assert any(n > clip for n in big) and all(n < clip for n in small), (big, small)
    for i, cfg in enumerate(cfgs):
        for step, (a, b) in enumerate(zip(together[i], alone(cfg, tmp_path / f"m{i}"))):
            assert deviation(a, b) <= TOL, (i, step)


def test_a_member_with_non_finite_loss_is_frozen_and_the_others_train_on(tiny_data, tmp_path):
    cfgs = [member(tiny_data["shards"], lr, seed, optim={"grad_clip": None})
            for lr, seed in ((1e-2, 0), (1e200, 1), (3e-3, 2))]
    tr, together = stacked(cfgs)
    bad = tr.diverged_step[1]
    assert bad is not None and 1 < bad < K and tr.diverged_step[0] is None and tr.diverged_step[2] is None
    assert not math.isfinite(together[1][bad - 1]["loss"] * 0 + together[1][bad - 1]["grad_norm"])
    # frozen: from its first dropped update on, its weights stay those it had before that step
    before = together[1][bad - 2]["weights"]
    for rec in together[1][bad - 1:]:
        assert all(torch.equal(rec["weights"][k], before[k]) for k in before)
        assert all(torch.isfinite(w).all() for w in rec["weights"].values())
    # alone, the same run goes non-finite at the same step; before it, the two agree
    single = alone(cfgs[1], tmp_path / "bad", steps=bad)
    assert not math.isfinite(single[bad - 1]["grad_norm"])
    for a, b in zip(together[1][: bad - 1], single[: bad - 1]):
        assert deviation(a, b) <= TOL
    for i in (0, 2):
        for step, (a, b) in enumerate(zip(together[i], alone(cfgs[i], tmp_path / f"m{i}"))):
            assert deviation(a, b) <= TOL, (i, step)


@pytest.mark.parametrize("sections, message", [
    ({"optim": {"name": "spam"}}, "SPAM"),
    ({"optim": {"perpgrad": True}}, "perpGrad"),
    ({"loss": {"kind": "stablemax"}}, "StableMax"),
    ({"post_step": {"mu_centering": True}}, "mu-centering"),
    ({"model": {"dropout": 0.1}}, "dropout"),
])
def test_unsupported_options_are_refused(tiny_data, sections, message):
    cfgs = [member(tiny_data["shards"], lr, 0, **sections) for lr in (1e-3, 1e-2)]
    with pytest.raises(UserError, match=message):
        StackedTrainer(cfgs, CPU)


def test_members_must_share_everything_but_lr_and_seed(tiny_data):
    cfgs = [member(tiny_data["shards"], 1e-3, 0), member(tiny_data["shards"], 1e-3, 1, optim={"eps": 1e-6})]
    with pytest.raises(UserError, match="'optim.eps' is 1e-08 and 1e-06"):
        StackedTrainer(cfgs, CPU)


@pytest.mark.slow
def test_compiled_stacked_steps_equal_eager_ones(tiny_data):
    """torch.compile of the vmapped model, the per-member losses and the update (what a GPU runs):
    the same losses as eager, in float32, to float32 rounding (about 2.5 min on a 2-core CPU)."""
    torch.set_default_dtype(torch.float32)
    cfgs = [member(tiny_data["shards"], lr, seed, **OEC) for lr, seed in ((1e-3, 0), (1e-2, 1))]
    losses = {}
    for compiled in (False, True):
        tr = StackedTrainer(cfgs, RuntimeConfig(device="cpu", compile=compiled))
        losses[compiled] = torch.stack([tr.train_step()["train_loss"] for _ in range(4)])
    assert torch.allclose(losses[True], losses[False], rtol=1e-5, atol=1e-5), losses
    assert (losses[False][-1] < losses[False][0]).all()


def test_bf16_autocast_members_train_as_they_would_alone(tiny_data, tmp_path):
    """What a GPU runs: bf16 autocast, here on the CPU, with qk-norm and RoPE (which leave q and k in
    float32 while v is bf16; SDPA under vmap does not cast them as autocast does alone). Each
    member's first losses equal the run's alone within 1e-3 (measured: 6e-5; the loss of member 1
    falls by 0.6 nats in these steps)."""
    torch.set_default_dtype(torch.float32)
    opts = {**OEC, "train": {**OEC["train"], "dtype": "bfloat16"}}
    cfgs = [member(tiny_data["shards"], lr, seed, **opts) for lr, seed in ((1e-3, 0), (1e-2, 1))]
    together = StackedTrainer(cfgs, CPU)
    losses = torch.stack([together.train_step()["train_loss"] for _ in range(3)])  # (steps, members)
    for i, cfg in enumerate(cfgs):
        tr = Trainer(cfg, tmp_path / str(i), CPU)
        for step in range(3):
            tr.train_step(False)
            alone_loss = (tr.stats.loss_sum / tr.stats.loss_n).item()
            tr.stats.loss_sum.zero_()
            tr.stats.loss_n = 0
            assert losses[step, i].item() == pytest.approx(alone_loss, rel=1e-3), (step, i)
