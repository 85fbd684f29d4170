"""The optimizers of runs that compile nothing (optim.Eager): torch's AdamW and our SPAM, without
the wrappers that import torch._dynamo. They must step bit for bit like the wrapped ones, save
and load the same state dicts, and a whole train job must then never import torch._dynamo."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import tiny_run
from stabilab.config import OptimConfig
from stabilab.optim import SPAM, EagerAdamW, EagerSPAM, PerpGrad, build_optimizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def params_and_groups(seed: int = 0):
    torch.manual_seed(seed)
    params = [torch.randn(8, 5, requires_grad=True), torch.randn(5, requires_grad=True),
              torch.randn(3, 4, 2, requires_grad=True)]
    return params, lambda ps: [{"params": [ps[0], ps[2]], "weight_decay": 0.1},
                               {"params": [ps[1]], "weight_decay": 0.0}]


def step_both(a, b, params_a, params_b, steps: int, seed: int = 1, lr_of=lambda n: 1e-2) -> None:
    """Same gradients for both, same LR schedule; every tensor equal after every step."""
    gen = torch.Generator().manual_seed(seed)
    for n in range(steps):
        for opt in (a, b):
            for group in opt.param_groups:
                group["lr"] = lr_of(n)
        grads = [torch.randn(p.shape, generator=gen) * (100.0 if n == steps // 2 else 1.0) for p in params_a]
        for ps, opt in ((params_a, a), (params_b, b)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
            opt.zero_grad(set_to_none=True)
        for pa, pb in zip(params_a, params_b):
            assert torch.equal(pa, pb), f"step {n}"
            assert pa.grad is None and pb.grad is None


def assert_same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        for k in sa["state"][i]:
            assert torch.equal(torch.as_tensor(sa["state"][i][k]), torch.as_tensor(sb["state"][i][k])), (i, k)


@pytest.mark.parametrize("kwargs", [{"foreach": True}, {"foreach": False}, {"amsgrad": True, "foreach": True}])
def test_eager_adamw_steps_and_saves_bit_for_bit_like_torch_adamw(kwargs):
    p0, groups = params_and_groups()
    pa = [p.detach().clone().requires_grad_() for p in p0]
    pb = [p.detach().clone().requires_grad_() for p in p0]
    a = torch.optim.AdamW(groups(pa), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **kwargs)
    b = EagerAdamW(groups(pb), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **kwargs)
    step_both(a, b, pa, pb, 12, lr_of=lambda n: 1e-2 * (n + 1) / 12)
    assert_same_state(a, b)
    # each loads the other's state dict and both go on alike (a checkpoint of either resumes in both)
    a2 = torch.optim.AdamW(groups(pa), lr=1e-2, **kwargs)
    b2 = EagerAdamW(groups(pb), lr=1e-2, **kwargs)
    a2.load_state_dict(b.state_dict())
    b2.load_state_dict(a.state_dict())
    assert_same_state(a2, b2)
    step_both(a2, b2, pa, pb, 5, seed=2)


def test_eager_spam_steps_and_saves_bit_for_bit_like_spam():
    p0, groups = params_and_groups(3)
    pa = [p.detach().clone().requires_grad_() for p in p0]
    pb = [p.detach().clone().requires_grad_() for p in p0]
    spam = dict(lr=1e-2, threshold=5.0, reset_interval=6, warmup=3, grace=2)  # resets, warm-ups, clipping
    a, b = SPAM(groups(pa), **spam), EagerSPAM(groups(pb), **spam)
    a.count_clipped = b.count_clipped = True
    step_both(a, b, pa, pb, 14)
    assert torch.equal(a.clipped_fraction, b.clipped_fraction)
    assert_same_state(a, b)
    a2, b2 = SPAM(groups(pa), **spam), EagerSPAM(groups(pb), **spam)
    a2.load_state_dict(b.state_dict())
    b2.load_state_dict(a.state_dict())
    step_both(a2, b2, pa, pb, 5, seed=2)


def test_build_optimizer_is_eager_unless_the_run_compiles():
    model = torch.nn.Linear(4, 3)
    cpu = torch.device("cpu")
    assert type(build_optimizer(model, OptimConfig(), cpu)) is EagerAdamW
    assert type(build_optimizer(model, OptimConfig(), cpu, compile=True)) is torch.optim.AdamW
    wrapped = build_optimizer(model, OptimConfig(name="spam", perpgrad=True), cpu)
    assert isinstance(wrapped, PerpGrad) and type(wrapped.base) is EagerSPAM


def test_train_and_grokking_jobs_never_import_torch_dynamo(tiny_data, tmp_path):
    """A train job (AdamW; SPAM with perpGrad, stopped after a checkpoint and resumed from it) and a
    grokking job in one fresh process: torch._dynamo (and sympy) stay unimported."""
    runs = [tiny_run(tiny_data["shards"], train={"steps": 12}),
            tiny_run(tiny_data["shards"], optim={"name": "spam", "perpgrad": True},
                     train={"steps": 12, "checkpoint_every": 5})]
    code = f"""
import json, sys
from stabilab.config import load_run_config
from stabilab.grokking.config import parse_spec
from stabilab.grokking.train import train_run
from stabilab.train.trainer import Trainer
runs = json.loads({json.dumps(json.dumps(runs))})
Trainer(load_run_config(runs[0]), {str(tmp_path / "a")!r}).run()
first = Trainer(load_run_config(runs[1]), {str(tmp_path / "b")!r})
step = first.train_step
def stop_at_7(measure):
    if first.step == 7:
        raise KeyboardInterrupt
    return step(measure)
first.train_step = stop_at_7
try:
    first.run()
except KeyboardInterrupt:
    pass
resumed = Trainer(load_run_config(runs[1]), {str(tmp_path / "b")!r}).run()
assert resumed["resumes"], resumed["resumes"]  # it went on from the step-5 checkpoint
train_run(parse_spec({{"modulus": 7, "epochs": 3, "eval_every": 1, "variant": "perpgrad"}}),
          {str(tmp_path / "g")!r}, log=lambda *a: None)
print(json.dumps(sorted(m for m in ("torch._dynamo", "sympy") if m in sys.modules)))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == []
