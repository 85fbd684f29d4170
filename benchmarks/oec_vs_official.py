"""OEC's own training code beside this pipeline's OEC model, on the same tokens, batches and schedule.

Trains, per learning rate (default 0.1 and 0.3), the OEC code's `nanoGPT/train.py` (a subprocess in
an official checkout, configured the OEC way: a config file of assignments that its
`configurator.py` executes) and this pipeline's `stabilab.train.Trainer` (what `stabilab train`
runs) with configs/oec.yaml's model, and sets the quantities of OEC's output-logit drift side by
side every `--every` steps: ||mu|| (padding rows in and out), the mean output logit (all padded
columns, OEC's convention, and the real vocabulary, ours), the mean final hidden state h-bar
(its norm, cos(h-bar, mu): OEC's convention, nanoGPT/train.py analyze_final_hidden_states), and
our per-position mean ||h|| and mean cos(h, mu) (stabilab.metrics.hidden_alignment).

Arms (--arms): `official` (the OEC code), `ours` (configs/oec.yaml as it is: padding rows masked,
warmup lr (t+1)/W) and `ours_matched` (the same with model.train_padding_rows and
optim.warmup_plus_one: the OEC code's treatment of both).

Same data: our token shards (results/<name>/data/shards) are written in the format OEC's loader
reads (`data/openwebtext/openwebtext_{train_000001,val_000000}.bin`, flat uint16, plus meta.pkl
with the padded vocabulary), in a folder of the harness, never in the checkout.

Same batches (--stream shared, the default): OEC's get_batch('train') draws window starts with
`torch.randint(0, len(data) - block_size, (batch_size,))` from the global torch RNG (seeded once;
its evaluations draw from the same RNG, so its training order depends on eval_interval); ours
draws them from numpy's default_rng([seed, step, micro]) (stabilab.shards.train_batch). The
harness launches OEC's train.py through `runpy` with `torch.randint` answered, for get_batch('train')
called from the training loop only, with our starts of (step, micro) -- OEC's code unchanged,
its k-th training batch is ours of step k // grad_accum, micro-batch k % grad_accum; windows
x = data[s:s+T], y = data[s+1:s+1+T] on both sides. `--stream native` leaves OEC's sampling alone
(same tokens, another order).

Same start (--init shared, the default): the launcher saves OEC's model as initialised (at its first
batch fetch, before any step) and our arms start from those weights (train.init_from), converted
by `oec_to_ours`; `--init own` lets each side initialise itself.

Metrics: computed by this script, with the same function on both sides, on one fixed batch (our
trainer's metrics batch: the first train.metrics_batch sequences of the validation windows); OEC's
side from its checkpoints (ckpt_<step>.pt, written every eval_interval = --every; read, then
deleted unless --keep-official-checkpoints) through OEC's own model class, ours at its metrics
steps inside the run. OEC's ckpt_<s> and our record at step s are both after s optimizer steps.

Usage (GPU box; see benchmarks/README.md for the packages the OEC code needs):
  python benchmarks/oec_vs_official.py --official /path/to/output-embedding-centering \\
      --official-pythonpath /path/to/oec-deps --shards results/oec/data/shards --out results/oec_vs_official
  python benchmarks/oec_vs_official.py --official ... --tiny --device cpu   # CPU smoke test (makes its shards)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
try:
    import stabilab  # noqa: F401
except ImportError:  # a bare checkout: the package from src/
    sys.path.insert(0, str(ROOT / "src"))

OEC_DATASET = "openwebtext"  # OEC's loader: one training chunk, windows from offset 0 (fineweb: 1027 chunks)
ARMS = ("official", "ours", "ours_matched")
MATCHED = {"model": {"train_padding_rows": True}, "optim": {"warmup_plus_one": True}}
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "batch_size": 4, "steps": 40, "every": 10,
        "warmup": 4, "eval_iters": 2}


# ----------------------------------------------------------------------------- data


def oec_data_files(folder: str | Path) -> dict[str, Path]:
    d = Path(folder) / "data" / OEC_DATASET
    return {"train": d / f"{OEC_DATASET}_train_000001.bin", "val": d / f"{OEC_DATASET}_val_000000.bin",
            "meta": d / "meta.pkl"}


def write_oec_data(shards: str | Path, folder: str | Path, rows: int) -> dict[str, Path]:
    """Our shards (train.bin, val.bin of meta.json's dtype) as OEC's loader reads them: flat uint16
    files `data/openwebtext/openwebtext_train_000001.bin` and `..._val_000000.bin` under `folder`,
    and meta.pkl with vocab_size = `rows` (the padded vocabulary, as our head). Token by token the
    same; refused when a token does not fit uint16 (OEC reads uint16 only)."""
    import pickle

    from stabilab.shards import read_meta

    meta = read_meta(shards)
    files = oec_data_files(folder)
    files["train"].parent.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        src = np.memmap(Path(shards) / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
        if src.size and int(src.max()) >= 2**16:
            raise SystemExit(f"{shards}/{split}.bin has token ids >= 65536: OEC's loader reads uint16")
        tmp = files[split].with_suffix(".tmp")
        np.asarray(src, dtype=np.uint16).tofile(tmp)
        tmp.replace(files[split])
    with open(files["meta"], "wb") as f:
        pickle.dump({"vocab_size": int(rows)}, f)
    return files


def read_oec_tokens(folder: str | Path, split: str) -> np.ndarray:
    """The tokens OEC's get_batch reads (np.memmap uint16), for checks."""
    return np.memmap(oec_data_files(folder)[split], dtype=np.uint16, mode="r")


def train_starts(n_tokens: int, seed: int, step: int, micro: int, batch_size: int, block_size: int) -> np.ndarray:
    """The window starts of our training batch (step, micro): stabilab.shards.train_batch's draw
    (tests/test_oec_harness.py checks the windows against it)."""
    rng = np.random.default_rng([seed, step, micro])
    return rng.integers(0, n_tokens - block_size - 1, size=batch_size)


# ----------------------------------------------------------------------------- weights


def oec_to_ours(sd: dict) -> dict:
    """An OEC model state dict (nanoGPT/model.py; '_orig_mod.' prefixes of a compiled model dropped)
    as ours (stabilab.model.GPT with model.init oec's architecture): SwiGLU's W and V fused into
    c_fc (gate first), the rotary module's fixed frequencies dropped (ours are buffers)."""
    import torch

    sd = {k.removeprefix("_orig_mod."): v for k, v in sd.items()}
    out, blocks = {}, set()
    for k, v in sd.items():
        if k.endswith("rotary.freqs"):
            continue
        if k.startswith("transformer.h."):
            i, rest = k.removeprefix("transformer.h.").split(".", 1)
            blocks.add(int(i))
            name = {"ln_1.weight": "ln_1.weight", "ln_2.weight": "ln_2.weight",
                    "attn.c_attn.weight": "attn.dense.weight", "attn.c_proj.weight": "attn.c_proj.weight",
                    "attn.q_layernorm.weight": "attn.q_norm.weight", "attn.k_layernorm.weight": "attn.k_norm.weight",
                    "mlp.W_2.weight": "mlp.c_proj.weight"}.get(rest)
            if name is not None:
                out[f"blocks.{i}.{name}"] = v
            elif rest not in ("mlp.W.weight", "mlp.V.weight"):
                raise KeyError(f"unexpected OEC parameter {k}")
        else:
            name = {"transformer.wte.weight": "wte.weight", "transformer.ln_f.weight": "ln_f.weight",
                    "lm_head.embedding.weight": "lm_head.weight"}.get(k)
            if name is None:
                raise KeyError(f"unexpected OEC parameter {k}")
            out[name] = v
    for i in sorted(blocks):
        out[f"blocks.{i}.mlp.c_fc.weight"] = torch.cat([sd[f"transformer.h.{i}.mlp.W.weight"],
                                                        sd[f"transformer.h.{i}.mlp.V.weight"]])
    return out


def load_oec_model_class(official: str | Path):
    """OEC's nanoGPT/model.py as a module (its GPT, GPTConfig), imported from the checkout."""
    import importlib.util

    path = Path(official) / "nanoGPT" / "model.py"
    spec = importlib.util.spec_from_file_location("oec_official_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- metrics


def drift_metrics(h, E, vocab: int, targets=None, chunk: int = 2048) -> dict:
    """The drift's quantities from final hidden states h (..., d) and the head's rows E (rows, d),
    `vocab` of them real. In float32 (logit means and cosines in float64):

    mu_all / mu_real: ||mean of E's rows||, all padded rows (OEC's get_mu_norms) / the real ones (ours);
    logits_mean_all: the mean logit over positions and all columns, OEC's logits_mean_mean (= h-bar . mu_all);
    logits_mean_real: over the real columns (stabilab.metrics.logit_stats' logits_mean);
    hbar_norm, cos_hbar_mu_all, cos_hbar_mu_real: h-bar = mean of h over positions; cos(h-bar, mu)
      is OEC's cos_output (analyze_final_hidden_states);
    hidden_norm, hidden_mu_cos: ours, mean over positions of ||h|| and of cos(h, mu_real)
      (stabilab.metrics.hidden_alignment);
    ce_all: with targets, the cross-entropy over all padded columns (OEC's loss), float32 head."""
    import torch

    from stabilab import metrics

    h = h.detach().float().reshape(-1, h.shape[-1])
    E = E.detach().float()
    h64, E64 = h.double(), E.double()
    hbar = h64.mean(0)
    mu_all, mu_real = E64.mean(0), E64[:vocab].mean(0)

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))

    out = {"mu_all": float(mu_all.norm()), "mu_real": float(mu_real.norm()),
           "logits_mean_all": float(hbar @ mu_all), "logits_mean_real": float(hbar @ mu_real),
           "hbar_norm": float(hbar.norm()), "cos_hbar_mu_all": cos(hbar, mu_all),
           "cos_hbar_mu_real": cos(hbar, mu_real)}
    out.update({k: float(v) for k, v in metrics.hidden_alignment(h, E[:vocab]).items()})
    if targets is not None:
        y = targets.reshape(-1)
        total = 0.0
        for i in range(0, h.shape[0], chunk):
            logits = h[i:i + chunk] @ E.T
            total += float(torch.nn.functional.cross_entropy(logits, y[i:i + chunk], reduction="sum"))
        out["ce_all"] = total / h.shape[0]
    return out


def fixed_batch(cfg, val_tokens):
    """Our trainer's metrics batch (StabilityProbe): the first metrics_batch sequences of the first
    validation batch (stabilab.shards.eval_batches)."""
    from stabilab.shards import eval_batches

    t = cfg.train
    x, y = eval_batches(val_tokens, t.eval_batches, t.batch_size, cfg.model.block_size)[0]
    return x[: t.metrics_batch], y[: t.metrics_batch]


# ----------------------------------------------------------------------------- configs


def our_run_config(args, lr: float, shards: str, arm: str, init_from: str = "") -> dict:
    """The run dict of our arm: configs/oec.yaml's baseline at this LR (stabilab.experiment), then
    the harness's sizes, schedule and logging; `ours_matched` adds MATCHED."""
    from stabilab.config import deep_merge
    from stabilab.experiment import Run, load_experiment, run_config

    experiment = load_experiment(args.config)
    n_layer = args.n_layer or experiment["model"].get("n_layer", 6)
    run = run_config(experiment, Run("lr", "baseline", int(n_layer), float(lr), args.seed), shards)
    model = {k: getattr(args, k) for k in ("n_head", "n_embd", "block_size") if getattr(args, k)}
    train = {"steps": args.steps, "metrics_every": args.every, "eval_every": args.every, "log_every": args.every,
             "checkpoint_every": args.steps, "init_from": init_from}
    for key in ("batch_size", "grad_accum", "eval_batches", "metrics_batch"):
        if getattr(args, key):
            train[key] = getattr(args, key)
    optim = {"min_lr_ratio": args.min_lr / lr}
    if args.warmup is not None:
        optim["warmup_steps"] = args.warmup
    run = deep_merge(run, {"model": model, "train": train, "optim": optim, "study": "oec_vs_official",
                           "variant": arm})
    return deep_merge(run, MATCHED) if arm == "ours_matched" else run


def oec_config_text(cfg, lr: float, args, device: str, out_dir: str) -> str:
    """OEC's run config, as its config/script_create_config.py writes one for the 16M "wor" runs
    (independent_weight_decay False, weight_decay 0, beta2 0.95, clip 1.0, swiglu, rope, qk-LayerNorm,
    untied, baseline: no z-loss, mu-loss or mu-centering), with our run's sizes and schedule."""
    m, t, o = cfg.model, cfg.train, cfg.optim
    cuda = device.startswith("cuda")
    lines = {
        "dataset": OEC_DATASET, "weight_tying": False, "muloss": False, "mucentering": False, "z_loss": False,
        "gamma": 0.0, "activation": "swiglu", "positional": "rope", "qk_layernorm": True, "bias": False,
        "final_ln": True, "final_ln_affine": True, "dropout": 0.0,
        "wandb_log": False, "out_dir": out_dir, "compile": bool(cuda and args.compile != "off"),
        "device": device, "dtype": "bfloat16" if cuda else "float32", "seed": int(args.oec_seed),
        "gradient_accumulation_steps": int(t.grad_accum), "batch_size": int(t.batch_size),
        "block_size": int(m.block_size), "max_iters": int(t.steps), "lr_decay_iters": int(t.steps),
        "decay_lr": True, "eval_interval": int(args.every), "eval_iters": int(args.eval_iters),
        "log_interval": int(min(args.every, 50)), "always_save_checkpoint": True,
        "independent_weight_decay": False, "weight_decay": 0.0, "grad_clip": float(o.grad_clip or 0.0),
        "beta1": float(o.betas[0]), "beta2": float(o.betas[1]),
        "n_layer": int(m.n_layer), "n_head": int(m.n_head), "n_embd": int(m.n_embd),
        "learning_rate": float(lr), "min_lr": float(args.min_lr), "warmup_iters": int(o.warmup_steps),
    }
    return "# written by benchmarks/oec_vs_official.py (OEC's configurator executes it)\n" + \
        "".join(f"{k} = {v!r}\n" for k, v in lines.items())


def oec_lr(it: int, lr: float, warmup: int, steps: int, min_lr: float) -> float:
    """OEC's get_lr_decayed (nanoGPT/train.py) with lr_decay_iters = max_iters = steps."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > steps:
        return min_lr
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * (it - warmup) / (steps - warmup))) * (lr - min_lr)


# ----------------------------------------------------------------------------- the official side


def launch_official(argv: list[str]) -> None:
    """Child process: OEC's train.py under runpy, its batches answered from our stream."""
    p = argparse.ArgumentParser()
    p.add_argument("--nanogpt", required=True)
    p.add_argument("--config-file", required=True)
    p.add_argument("--stream", choices=["shared", "native"], default="shared")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, required=True)
    p.add_argument("--grad-accum", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--block-size", type=int, required=True)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--float64", action="store_true")
    a = p.parse_args(argv)
    import runpy

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.float64:  # OEC's model is built in torch's default dtype (CPU: no autocast, dtype 'float32' is a no-op)
        torch.set_default_dtype(torch.float64)
    real_randint = torch.randint
    state = {"served": 0, "init_saved": False}

    def randint(*args, **kwargs):
        f1 = sys._getframe(1)
        if (f1.f_code.co_name == "get_batch" and f1.f_locals.get("split") == "train"
                and sys._getframe(2).f_code.co_name == "<module>"):
            if not state["init_saved"]:  # OEC's first training fetch comes after its init, before any step
                model = f1.f_globals["model"]
                model = getattr(model, "_orig_mod", model)
                torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, "oec_init.pt.tmp")
                os.replace("oec_init.pt.tmp", "oec_init.pt")  # whole or absent: --concurrent reads it at once
                state["init_saved"] = True
            if a.stream == "shared":
                high = kwargs.get("high", args[1] if len(args) > 1 else None)
                assert high == a.n_train - a.block_size, f"OEC's train file has {high + a.block_size} tokens, " \
                                                         f"ours {a.n_train}"
                step, micro = divmod(state["served"], a.grad_accum)
                state["served"] += 1
                return torch.from_numpy(train_starts(a.n_train, a.seed, step, micro, a.batch_size, a.block_size))
        return real_randint(*args, **kwargs)

    def report():
        Path("stream.json").write_text(json.dumps({"stream": a.stream, "served": state["served"]}) + "\n")

    import atexit

    atexit.register(report)
    torch.randint = randint
    sys.path.insert(0, a.nanogpt)  # as `python train.py` from nanoGPT/ (its `from model import`, `config.settings`)
    sys.argv = [str(Path(a.nanogpt) / "train.py"), a.config_file]
    runpy.run_path(str(Path(a.nanogpt) / "train.py"), run_name="__main__")


def start_official(args, cfg, lr: float, folder: Path, data_dir: Path, device: str, env: dict):
    """Start OEC's train.py in `folder` (its cwd: configurator.py linked in, data/ linked to the
    harness's); returns the process."""
    nanogpt = Path(args.official).resolve() / "nanoGPT"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [folder / "oec_init.pt", folder / "stream.json", *(folder / "out").glob("ckpt_*.pt")]:
        stale.unlink(missing_ok=True)
    for name, target in (("configurator.py", nanogpt / "configurator.py"), ("data", data_dir.resolve() / "data")):
        link = folder / name
        if not link.exists():
            link.symlink_to(target)
    (folder / "oec_config.py").write_text(oec_config_text(cfg, lr, args, device, "out"))
    n_train = len(read_oec_tokens(data_dir, "train"))
    t = cfg.train
    cmd = [sys.executable, str(Path(__file__).resolve()), "_official", "--nanogpt", str(nanogpt),
           "--config-file", "oec_config.py", "--stream", args.stream, "--seed", str(cfg.seed),
           "--n-train", str(n_train), "--grad-accum", str(t.grad_accum), "--batch-size", str(t.batch_size),
           "--block-size", str(cfg.model.block_size), "--threads", str(args.threads)] + \
        (["--float64"] if args.float64 else [])
    with open(folder / "stdout.log", "w") as log:
        return subprocess.Popen(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(proc, folder: Path, what: str) -> None:
    rc = proc.wait()
    if rc:
        tail = (folder / "stdout.log").read_text().splitlines()[-15:]
        raise SystemExit(f"{what} failed (exit {rc}) in {folder}:\n" + "\n".join(tail))


def check_stream(args, cfg, folder: Path) -> None:
    served = json.loads((folder / "stream.json").read_text())["served"]
    need = cfg.train.steps * cfg.train.grad_accum
    if args.stream == "shared" and served < need:
        raise SystemExit(f"OEC took {served} training batches from our stream, expected >= {need}")


def wait_for(path: Path, proc) -> None:
    """Until `path` exists (OEC's initial weights), or its process ended without it."""
    while not path.exists():
        if proc is None or proc.poll() is not None:
            time.sleep(0.5)
            if path.exists():
                return
            raise SystemExit(f"--init shared needs OEC's initial weights: no {path} (run the official arm, "
                             "or pass --init own)")
        time.sleep(1.0)


def start_ours(args, run: dict, folder: Path, device: str, env: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    cmd = [sys.executable, str(Path(__file__).resolve()), "_ours", "--run", str(folder / "run.json"),
           "--out", str(folder / "run"), "--device", device, "--compile", args.compile,
           "--threads", str(args.threads)] + (["--float64"] if args.float64 else [])
    with open(folder / "stdout.log", "w") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def official_rows(args, cfg, folder: Path, batch, device) -> list[dict]:
    """Metrics of OEC's initial weights and of each checkpoint, through OEC's model class; beside
    them the max relative difference of our model's hidden states on the same weights."""
    import torch

    from stabilab.device import autocast
    from stabilab.model import GPT

    oec = load_oec_model_class(args.official)
    x, y = (t.to(device) for t in batch)
    files = [(0, folder / "oec_init.pt")] + sorted(
        (int(p.stem.split("_")[1]), p) for p in (folder / "out").glob("ckpt_*.pt"))
    ours = GPT(cfg.model).to(device).eval()
    rows = []
    for step, path in files:
        ckpt = torch.load(path, map_location=device, weights_only=False)
        sd = ckpt["model"] if "model" in ckpt else ckpt
        sd = {k.removeprefix("_orig_mod."): v for k, v in sd.items()}
        args_ = ckpt.get("model_args") or dict(
            n_layer=cfg.model.n_layer, n_head=cfg.model.n_head, n_embd=cfg.model.n_embd,
            block_size=cfg.model.block_size, bias=False, vocab_size=sd["lm_head.embedding.weight"].shape[0],
            dropout=0.0, activation="swiglu", positional="rope", weight_tying=False, z_loss=False,
            qk_layernorm=True, final_ln=True, final_ln_affine=True, muloss=False, gamma=0.0)
        model = oec.GPT(oec.GPTConfig(**args_)).to(device)
        model.load_state_dict(sd)
        model.eval()
        ours.load_state_dict(oec_to_ours(sd))
        with torch.no_grad(), autocast(torch.device(device), cfg.train.dtype):
            h = model.get_final_hidden_states(x)
            h_ours = ours.hidden(x)
        row = {"step": step, **drift_metrics(h, model.lm_head.embedding.weight, cfg.model.vocab_size, y)}
        row["h_ours_rel_diff"] = float((h.float() - h_ours.float()).norm() / h.float().norm())
        rows.append(row)
        if step and not args.keep_official_checkpoints:
            path.unlink()
    return rows


# ----------------------------------------------------------------------------- our side


def run_ours_child(argv: list[str]) -> None:
    """Child process: stabilab's Trainer (as `stabilab train --run`), plus the harness's drift
    metrics on the trainer's own metrics batch at each of its metrics steps (`oecx_` keys)."""
    p = argparse.ArgumentParser()
    p.add_argument("--run", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--float64", action="store_true")
    a = p.parse_args(argv)
    import torch

    from stabilab.config import RuntimeConfig, load_run_config
    from stabilab.device import autocast
    from stabilab.train.distributed import Processes
    from stabilab.train.trainer import Trainer

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.float64:  # our model, optimizer state and loss then run in float64 (CPU, train.dtype float32)
        torch.set_default_dtype(torch.float64)

    class HarnessTrainer(Trainer):
        def stability_metrics(self):
            out = super().stability_metrics()
            x, y = self.probe.batch
            self.model.eval()
            with torch.no_grad(), autocast(self.device, self.cfg.train.dtype):
                h = self.model.hidden(x)
            self.model.train()
            extra = drift_metrics(h, self.model.lm_head.weight, self.cfg.model.vocab_size, y)
            out.update({f"oecx_{k}": torch.tensor(v, dtype=torch.float64) for k, v in extra.items()})
            return out

    cfg = load_run_config(json.loads(Path(a.run).read_text()))
    compile_ = {"on": True, "off": False}.get(a.compile, "auto")
    runtime = RuntimeConfig(device=a.device, compile=compile_, keep_weights=False)
    try:
        HarnessTrainer(cfg, a.out, runtime).run()
    finally:
        Processes.shutdown()


def our_rows(folder: Path) -> list[dict]:
    rows = []
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "oecx_mu_all" in rec:
            rows.append({"step": rec["step"], **{k[5:]: v for k, v in rec.items() if k.startswith("oecx_")},
                         "pipeline_mu_norm": rec.get("mu_norm"), "pipeline_logits_mean": rec.get("logits_mean")})
    return rows


def init_rows(cfg, init_sd, batch, device) -> list[dict]:
    """Step 0 of our arm: its initial weights through our model (OEC's weights with --init shared)."""
    import torch

    from stabilab.device import autocast
    from stabilab.model import seeded_model

    model = seeded_model(cfg.model, cfg.seed, device).eval()
    if init_sd is not None:
        model.load_state_dict(init_sd)
    x, y = (t.to(device) for t in batch)
    with torch.no_grad(), autocast(torch.device(device), cfg.train.dtype):
        h = model.hidden(x)
    return [{"step": 0, **drift_metrics(h, model.lm_head.weight, cfg.model.vocab_size, y)}]


# ----------------------------------------------------------------------------- report


COLUMNS = [("mu_all", "‖μ‖ all rows", ".3g"), ("mu_real", "‖μ‖ real rows", ".3g"),
           ("logits_mean_all", "mean logit (all cols, OEC)", ".3g"),
           ("logits_mean_real", "mean logit (real cols, ours)", ".3g"),
           ("hbar_norm", "‖h̄‖", ".3g"), ("cos_hbar_mu_all", "cos(h̄, μ_all) (OEC)", "+.3f"),
           ("hidden_norm", "mean ‖h‖ (ours)", ".3g"), ("hidden_mu_cos", "mean cos(h, μ) (ours)", "+.3f"),
           ("ce_all", "CE fixed batch", ".3f")]


def table(rows: list[dict]) -> str:
    head = ["LR", "step", "Σ lr", "arm"] + [c[1] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['lr']:g}", str(r["step"]), f"{r['summed_lr']:.3g}", r["arm"]]
        cells += [format(r[k], f) if isinstance(r.get(k), (int, float)) and r.get(k) == r.get(k) else "n/a"
                  for k, _, f in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summed(lrs: list[float], step: int) -> float:
    return float(sum(lrs[:step]))


# ----------------------------------------------------------------------------- main


def tiny_shards(folder: Path) -> str:
    """GPT-2 token shards of a slice of the embedded Shakespeare corpus (CPU smoke tests)."""
    from stabilab import corpus, shards, tokenizer

    out = folder / "shards"
    if (out / "meta.json").exists():
        return str(out)
    text = folder / "corpus.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    with open(text, "w") as f:
        for doc_id, body in corpus.read_source({"source": "embedded"}):
            f.write(json.dumps({"id": doc_id, "text": body[:6000]}) + "\n")
    corpus.write_split({"source": "text", "paths": [str(text)], "val_fraction": 0.1, "split_seed": 0}, folder / "split")
    files = {s: folder / "split" / f"{s}.jsonl.gz" for s in shards.SPLITS}
    shards.write_shards(tokenizer.gpt2(), files, out)
    return str(out)


def preset_shards(experiment: dict, env: dict) -> str:
    """The preset's token shards (results/<name>/data/shards), made by the pipeline's data steps
    (corpus -> tokenizer -> tokenize, as benchmarks/bench_grid.py runs them) when missing."""
    from stabilab.experiment import shards_dir
    from stabilab.layout import RESULTS, TOKENIZER

    shards = ROOT / shards_dir(experiment)
    if (shards / "meta.json").exists():
        return str(shards)
    res = ROOT / RESULTS.format(name=experiment["name"])
    tok = experiment["tokenizer"]
    steps = [["corpus", "--spec", json.dumps(experiment["data"], sort_keys=True), "--out", str(res / "data/corpus")],
             ["tokenizer", "--kind", tok.get("kind", "bpe"), "--vocab-size", str(tok.get("vocab_size", 2048)),
              "--corpus", str(res / "data/corpus"), "--out", str(res / TOKENIZER)],
             ["tokenize", "--tokenizer", str(res / TOKENIZER), "--corpus", str(res / "data/corpus"),
              "--out", str(shards)]]
    for cli in steps:
        print(f"data: stabilab {cli[0]} ...", flush=True)
        if subprocess.run([sys.executable, "-m", "stabilab.cli", *cli], cwd=ROOT, env=env).returncode:
            raise SystemExit(f"stabilab {cli[0]} failed (the preset's data source must be on this machine)")
    return str(shards)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--official", required=True, help="an official checkout (the folder holding nanoGPT/)")
    p.add_argument("--official-pythonpath", default="",
                   help="folder(s) with the OEC code's extra packages (rotary-embedding-torch, einops), "
                        "os.pathsep-separated")
    p.add_argument("--config", default=str(ROOT / "configs" / "oec.yaml"), help="our preset (model, optimizer)")
    p.add_argument("--shards", help="our token shards (default: results/<preset name>/data/shards, made by the "
                                    "pipeline's data steps when missing; --tiny: made here)")
    p.add_argument("--out", help="output folder (default results/oec_vs_official[_tiny])")
    p.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.3])
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    p.add_argument("--every", type=int, help="steps between measurements, OEC's eval_interval (default 200)")
    p.add_argument("--warmup", type=int, help="warmup steps (default: the preset's)")
    p.add_argument("--min-lr", type=float, default=0.0,
                   help="the LR at the end of the cosine, both sides (oec.yaml: 0; OEC's runs: 1e-5)")
    p.add_argument("--stream", choices=["shared", "native"], default="shared")
    p.add_argument("--init", choices=["shared", "own"], default="shared")
    p.add_argument("--seed", type=int, default=0, help="our batch order (and our init with --init own)")
    p.add_argument("--oec-seed", type=int, default=1,
                   help="OEC's seed (its init; its batch order with --stream native)")
    p.add_argument("--eval-iters", type=int, help="OEC's eval_iters at each eval_interval (default 10)")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="both sides (OEC's compile only on CUDA); auto: on CUDA (OEC's compile=True, ours with "
                        "CUDA graphs, as the pipeline)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--keep-official-checkpoints", action="store_true")
    p.add_argument("--concurrent", action="store_true",
                   help="per LR, run the arms at the same time (ours start once OEC has initialised): a small "
                        "model leaves most of a GPU idle; the seconds are then not solo timings")
    p.add_argument("--float64", action="store_true",
                   help="CPU only: both sides train in float64 (torch's default dtype), a diagnostic of rounding")
    p.add_argument("--tiny", action="store_true", help="a tiny model, batch and run for a CPU smoke test")
    for k in ("n_layer", "n_head", "n_embd", "block_size"):
        p.add_argument("--" + k.replace("_", "-"), type=int, help=f"model.{k} (default: the preset's)")
    for k in ("batch_size", "grad_accum", "eval_batches", "metrics_batch"):
        p.add_argument("--" + k.replace("_", "-"), type=int, help=f"train.{k} (default: the preset's)")
    args = p.parse_args(argv)
    defaults = {"every": 200, "eval_iters": 10}
    if args.tiny:
        defaults = {**TINY, "eval_batches": 2, "metrics_batch": 4}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_official"]:
        return launch_official(argv[1:])
    if argv[:1] == ["_ours"]:
        return run_ours_child(argv[1:])
    args = parse_args(argv)
    import torch

    from stabilab.config import load_run_config
    from stabilab.experiment import load_experiment
    from stabilab.model import padded_vocab
    from stabilab.optim import lr_at
    from stabilab.shards import read_meta
    from stabilab.train.checkpoint import load_weights, save_checked

    arms = [a for a in args.arms.split(",") if a]
    if set(arms) - set(ARMS):
        raise SystemExit(f"unknown arm(s) {set(arms) - set(ARMS)} (allowed: {', '.join(ARMS)})")
    out = Path(args.out or ROOT / "results" / ("oec_vs_official_tiny" if args.tiny else "oec_vs_official"))
    out.mkdir(parents=True, exist_ok=True)
    experiment = load_experiment(args.config)
    pythonpath = os.pathsep.join(p for p in [args.official_pythonpath, str(ROOT / "src"),
                                             os.environ.get("PYTHONPATH", "")] if p)
    env = {**os.environ, "PYTHONPATH": pythonpath}
    shards = args.shards or (tiny_shards(out / "data") if args.tiny else preset_shards(experiment, env))
    meta = read_meta(shards)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.float64 and device != "cpu":
        raise SystemExit("--float64 is for the CPU (on CUDA both sides train under bf16 autocast)")
    args.steps = args.steps or experiment["train"]["steps"]
    vocab = meta["tokenizer"]["vocab_size"]
    oec_files = write_oec_data(shards, out, padded_vocab(vocab))
    val = read_oec_tokens(out, "val")
    for p in reversed(args.official_pythonpath.split(os.pathsep) if args.official_pythonpath else []):
        sys.path.insert(0, p)
    setup = {"official": str(Path(args.official).resolve()), "shards": shards, "tokens": meta["tokens"],
             "vocab": vocab, "rows": padded_vocab(vocab), "oec_data": {k: str(v) for k, v in oec_files.items()},
             "device": device, "float64": args.float64, "stream": args.stream, "init": args.init, "arms": arms,
             "lrs": args.lrs, "torch": torch.__version__}
    for lr in args.lrs:
        lr_dir = out / f"lr{lr:g}"
        base = load_run_config(our_run_config(args, lr, shards, "ours")).with_vocab(vocab)
        batch = fixed_batch(base, val)
        official_dir, init_file, ours_arms = lr_dir / "official", "", [a for a in arms if a != "official"]
        t0, seconds, procs = time.time(), {}, {}
        if "official" in arms:
            procs["official"] = start_official(args, base, lr, official_dir, out, device, env)
            if not args.concurrent:
                finish(procs["official"], official_dir, "OEC's train.py")
                seconds["official"] = time.time() - t0
        if args.init == "shared" and ours_arms:
            wait_for(official_dir / "oec_init.pt", procs.get("official"))
            sd = oec_to_ours(torch.load(official_dir / "oec_init.pt", weights_only=True))
            init_file = str(lr_dir / "init_from_oec.pt")
            save_checked({"model": sd, "config": base.to_dict(), "step": 0}, Path(init_file))
        runs = {arm: our_run_config(args, lr, shards, arm, init_file) for arm in ours_arms}
        for arm in ours_arms:
            t1 = time.time()
            procs[arm] = start_ours(args, runs[arm], lr_dir / arm, device, env)
            if not args.concurrent:
                finish(procs[arm], lr_dir / arm, f"our arm {arm}")
                seconds[arm] = time.time() - t1
        for arm, proc in procs.items():  # --concurrent: all started, now wait
            finish(proc, lr_dir / arm, "OEC's train.py" if arm == "official" else f"our arm {arm}")
            seconds.setdefault(arm, time.time() - t0)
        arm_rows = {}
        if "official" in arms:
            check_stream(args, base, official_dir)
            arm_rows["official"] = official_rows(args, base, official_dir, batch, device)
        init_sd = load_weights(init_file, "cpu")["model"] if init_file else None
        for arm in ours_arms:
            cfg = load_run_config(runs[arm]).with_vocab(vocab)
            arm_rows[arm] = init_rows(cfg, init_sd, batch, device) + our_rows(lr_dir / arm / "run")
        lr_rows = []
        for arm, rs in arm_rows.items():
            if arm == "official":
                lrs = [oec_lr(i, lr, base.optim.warmup_steps, args.steps, args.min_lr) for i in range(args.steps + 1)]
            else:
                cfg = load_run_config(runs[arm]).with_vocab(vocab)
                lrs = [lr_at(i, cfg.optim, args.steps) for i in range(args.steps)]
            lr_rows += [{"lr": lr, "arm": arm, "summed_lr": summed(lrs, r["step"]), **r} for r in rs]
        (lr_dir / "rows.json").write_text(json.dumps({"setup": {**setup, "lr": lr, "seconds": seconds,
                                                                "concurrent": args.concurrent},
                                                      "rows": lr_rows}, indent=1) + "\n")
    # the table: every LR of this output folder (earlier invocations' too, e.g. one LR per command)
    rows, setups = [], []
    for path in sorted(out.glob("lr*/rows.json")):
        data = json.loads(path.read_text())
        rows += data["rows"]
        setups.append(data["setup"])
    rows.sort(key=lambda r: (r["lr"], r["step"], ARMS.index(r["arm"])))
    (out / "comparison.json").write_text(json.dumps({"setups": setups, "rows": rows}, indent=1) + "\n")
    md = table(rows)
    (out / "comparison.md").write_text(md + "\n")
    print(md)
    print(f"\nwritten: {out / 'comparison.md'}, {out / 'comparison.json'}")
    return rows


if __name__ == "__main__":
    main()
