"""Train one run: from a resolved RunConfig into an output folder.

Outputs: config.json (resolved), metrics.jsonl, ckpt.pt (resumable), summary.json (written
last and atomically: a folder without it is an unfinished run). On steps that neither log nor
measure, the loop never waits for the device.

Data parallel: under `torchrun` (WORLD_SIZE > 1) each process takes every WORLD_SIZE-th
micro-batch of the step's `grad_accum` micro-batches, so the global batch, and the batches
themselves, are those of a single-process run. Rank 0 alone evaluates and writes files.

Preemption: on SIGTERM the run stops at the next log step (all ranks agree on it), writes a
checkpoint and exits with PREEMPTED_EXIT_CODE; the next attempt resumes from it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import metrics as M
from .config import RunConfig
from .errors import UserError
from .model import GPT, attention_params_by_hand
from .optim import build_optimizer, lr_at
from .shards import eval_batches, open_shards, train_batch

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: checkpoint written on SIGTERM, the job may be requeued


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("bad value for config key 'train.device': 'cuda' but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def autocast(device: torch.device, dtype: str):
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _json_value(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def to_floats(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar tensors as floats, in one device-to-host transfer."""
    if not tensors:
        return {}
    values = torch.stack([t.detach().reshape(()).to(torch.float64) for t in tensors.values()]).tolist()
    return dict(zip(tensors, values))


class Trainer:
    def __init__(self, cfg: RunConfig, out_dir: str | Path):
        self.cfg, self.out = cfg, Path(out_dir)
        t = cfg.train
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and t.grad_accum % self.world:
            raise UserError(f"train.grad_accum ({t.grad_accum}) must be a multiple of the process count ({self.world})")
        self.device = pick_device(t.device, int(os.environ.get("LOCAL_RANK", "0")))
        if self.world > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.main = self.rank == 0
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.meta, data = open_shards(cfg.data.shards, cfg.data.tokenizer, cfg.data.vocab_size)
        self.train_tokens, val_tokens = data["train"], data["val"]
        cfg.model.vocab_size = self.meta["tokenizer"]["vocab_size"]
        self.model = GPT(cfg.model).to(self.device)
        self.forward = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(self.model, device_ids=[self.device.index]
                                                   if self.device.type == "cuda" else None)
        # Model and fused head loss compile as one graph (its forward and written-out backward
        # become one reduction and one elementwise kernel over the logits), and so do model and
        # metrics for the metrics pass; SPAM's and perpGrad's updates compile to a fused kernel per tensor.
        self.loss_fn = torch.compile(self._loss) if t.compile else self._loss
        self.output_metrics = torch.compile(self._output_metrics) if t.compile else self._output_metrics
        self.opt = build_optimizer(self.model, cfg.optim, self.device, compile=t.compile)
        self.val = [self._to_device(x, y) for x, y in eval_batches(val_tokens, t.eval_batches, t.batch_size,
                                                                  cfg.model.block_size)]
        self.groups = {"embedding": [self.model.wte.weight, self.model.wpe.weight]}
        for i, block in enumerate(self.model.blocks):
            self.groups[f"block{i}"] = list(block.parameters())
        self.groups["head"] = list(self.model.ln_f.parameters()) + (
            [] if cfg.model.tie_embeddings else [self.model.lm_head.weight])
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # Device-side running statistics, carried in checkpoints.
        w = t.grad_var_window
        self.stats = {
            "loss_sum": torch.zeros((), device=self.device), "loss_n": 0,
            "gn_hist": torch.zeros(w, device=self.device), "gn_sum": torch.zeros((), device=self.device),
            "spikes": torch.zeros((), device=self.device),
        }
        self.step = 0
        self.lr = 0.0
        self.initial_loss: float | None = None
        self.above_steps = 0
        self.diverged: dict | None = None
        self.elapsed = 0.0
        self.stop_requested = False

    # ------------------------------------------------------------------ io

    def _to_device(self, x: torch.Tensor, y: torch.Tensor):
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y

    @property
    def tokens_per_step(self) -> int:
        """The global batch in tokens (all processes, all micro-batches)."""
        t = self.cfg.train
        return t.batch_size * t.grad_accum * self.cfg.model.block_size

    @property
    def ckpt_path(self) -> Path:
        return self.out / "ckpt.pt"

    def save_checkpoint(self) -> None:
        if not self.main:
            return
        state = {
            "step": self.step, "initial_loss": self.initial_loss, "above_steps": self.above_steps,
            "elapsed": self.elapsed, "stats": self.stats,
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }
        tmp = self.ckpt_path.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt_path)

    def load_checkpoint(self) -> bool:
        if not self.ckpt_path.exists():
            return False
        state = torch.load(self.ckpt_path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.initial_loss = state["step"], state["initial_loss"]
        self.above_steps, self.elapsed, self.stats = state["above_steps"], state["elapsed"], state["stats"]
        torch.set_rng_state(state["rng_cpu"].cpu())
        if state["rng_cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.device)
        if self.main:  # records after the checkpoint belong to the lost attempt: drop them
            log = self.out / "metrics.jsonl"
            if log.exists():
                kept = [line for line in log.read_text().splitlines()
                        if line and json.loads(line)["step"] <= self.step]
                atomic_write(log, "".join(line + "\n" for line in kept))
        return True

    def prepare_folder(self) -> bool:
        """Resume from the checkpoint of the same config, else start the folder afresh."""
        config_path = self.out / "config.json"
        config = json.dumps(self.cfg.to_dict(), indent=2) + "\n"
        same = config_path.exists() and config_path.read_text() == config
        if same and self.load_checkpoint():
            return True
        self._barrier()  # no rank may still be reading an old checkpoint
        if self.main:
            for name in ("ckpt.pt", "metrics.jsonl", "summary.json"):
                (self.out / name).unlink(missing_ok=True)
            atomic_write(config_path, config)
        return False

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # ------------------------------------------------------------------ steps

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward(x, y, self.cfg.loss)

    def train_step(self, measure: bool) -> dict[str, torch.Tensor]:
        cfg, t = self.cfg, self.cfg.train
        self.lr = lr_at(self.step, cfg.optim, t.steps)
        for group in self.opt.param_groups:
            group["lr"] = self.lr
        mine = range(self.rank, t.grad_accum, self.world)  # this process's micro-batches
        for i, micro in enumerate(mine):
            x, y = self._to_device(*train_batch(self.train_tokens, cfg.seed, self.step, micro, t.batch_size,
                                                cfg.model.block_size))
            sync = self.world == 1 or i == len(mine) - 1  # all-reduce gradients once per step
            with autocast(self.device, t.dtype), (contextlib.nullcontext() if sync else self.forward.no_sync()):
                loss, ce = self.loss_fn(x, y)
                # DDP averages over processes: scale so the result is the mean over all micro-batches
                (loss * self.world / t.grad_accum).backward()
            self.stats["loss_sum"] += ce.detach()
        self.stats["loss_n"] += len(mine)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True).float()
        out = {"grad_norm": grad_norm}
        if measure:
            out.update(M.grad_group_norms(self.groups))
            self.opt.count_clipped = True
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if cfg.post_step.mu_centering:
            with torch.no_grad():
                E = self.model.output_embedding()
                E.sub_(E.mean(dim=0, keepdim=True))
        # Gradient-spike statistics (SPAM paper): GSS = norm / running mean of earlier norms.
        s, n = self.stats, self.step
        if n >= 1:
            s["spikes"] += (grad_norm > t.spike_factor * s["gn_sum"] / n).float()
        s["gn_sum"] += grad_norm
        s["gn_hist"][n % t.grad_var_window] = grad_norm
        if measure:
            self.opt.count_clipped = False
            if getattr(self.opt, "clipped_fraction", None) is not None:
                out["spam_clipped_frac"] = self.opt.clipped_fraction
        self.step += 1
        return out

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for x, y in self.val:
            with autocast(self.device, self.cfg.train.dtype):
                total += self.model(x, y, self.cfg.loss)[1]
        self.model.train()
        return (total / len(self.val)).item()

    @torch.no_grad()
    def _output_metrics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The metrics of one forward pass: attention logit max per layer, logit statistics,
        collapse fractions. Compiled with the model when `train.compile` is set: the logit
        statistics then share their passes over the logits."""
        cfg = self.cfg
        with autocast(self.device, cfg.train.dtype):
            logits, attn_max = self.model.logits_and_attention_max(x)
        out = {f"attn_logit_max_l{i}": m for i, m in enumerate(attn_max.unbind())}
        out.update(M.logit_stats(logits))
        out.update(M.collapse_fractions(logits, y, cfg.loss.kind))
        return out

    @torch.no_grad()
    def stability_metrics(self) -> dict[str, torch.Tensor]:
        """METHODS.md §3 on a fixed batch: the first `metrics_batch` validation sequences."""
        m, cfg = self.model, self.cfg
        x, y = (t[: cfg.train.metrics_batch] for t in self.val[0])
        m.eval()
        out = self.output_metrics(x, y)
        m.train()
        vocab = cfg.model.vocab_size
        out["tev_mean"], out["tev_std"] = M.tev(m.wte.weight[:vocab])
        out["mu_norm"] = M.mu_norm(m.output_embedding())
        if not cfg.model.tie_embeddings:
            out["tev_lm_head_mean"], out["tev_lm_head_std"] = M.tev(m.output_embedding())
            out["mu_norm_wte"] = M.mu_norm(m.wte.weight[:vocab])
        window = min(self.step, cfg.train.grad_var_window)
        out["grad_norm_var"] = self.stats["gn_hist"][:window].var(correction=0)
        out["spike_count"] = self.stats["spikes"]
        return out

    # ------------------------------------------------------------------ loop

    def check_divergence(self, loss: float) -> None:
        t = self.cfg.train
        if not math.isfinite(loss):
            self.diverged = {"step": self.step, "reason": "non-finite loss"}
            return
        if self.initial_loss is None:
            self.initial_loss = loss
        if loss > self.initial_loss + t.divergence.margin:
            self.above_steps += t.log_every
            if self.above_steps >= t.divergence.patience:
                self.diverged = {"step": self.step, "reason": f"loss above initial + {t.divergence.margin} "
                                                              f"for {self.above_steps} steps"}
        else:
            self.above_steps = 0

    def _log_record(self, step: int, out: dict, measure: bool, evaluating: bool, seconds: float,
                    steps_done: int) -> dict:
        """Gather one metrics record (the only place the loop waits for the device)."""
        s = self.stats
        loss = torch.stack([s["loss_sum"], torch.tensor(float(s["loss_n"]), device=self.device)])
        if self.world > 1:
            dist.all_reduce(loss)
        tokens_per_step = self.tokens_per_step
        values = {"train_loss": loss[0] / loss[1].clamp(min=1), **out}
        s["loss_sum"].zero_()
        s["loss_n"] = 0
        if self.main and measure:
            values.update(self.stability_metrics())
        values = to_floats(values)  # the record's one wait for the device
        rec = {"step": step, "tokens": step * tokens_per_step, "train_loss": values.pop("train_loss"),
               "lr": self.lr, **values}
        if self.main and evaluating:
            rec["val_loss"] = self.evaluate()
        rec["tokens_per_s"] = steps_done * tokens_per_step / max(seconds, 1e-9)
        return rec

    def _agree_to_stop(self) -> bool:
        """All ranks stop together: on divergence (rank 0's verdict) or any rank's SIGTERM."""
        if self.world == 1:
            return self.stop_requested or self.diverged is not None
        flags = torch.tensor([float(self.stop_requested), float(self.diverged is not None)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.stop_requested = bool(flags[0])
        if flags[1] and self.diverged is None:
            self.diverged = {"step": self.step, "reason": "diverged (rank 0)"}
        return bool(flags.max())

    def run(self) -> dict:
        t = self.cfg.train
        resumed = self.prepare_folder()
        log = open(self.out / "metrics.jsonl", "a") if self.main else None
        tb = self._tensorboard() if self.main else None
        bar = self._progress() if self.main else None
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        tick, tick_step = time.time(), self.step
        if resumed and self.main:
            print(f"resumed from step {self.step}", flush=True)
        try:
            while self.step < t.steps:
                step = self.step + 1  # the step about to complete
                measure = step % t.metrics_every == 0 or step == t.steps
                out = self.train_step(measure)
                logging = step == 1 or step % t.log_every == 0 or step == t.steps
                evaluating = step % t.eval_every == 0 or step == t.steps
                if logging or evaluating or measure:
                    now = time.time()
                    self.elapsed += now - tick
                    rec = self._log_record(step, out, measure, evaluating, now - tick, step - tick_step)
                    if self.main:
                        self.check_divergence(rec["train_loss"])
                        log.write(json.dumps({k: _json_value(v) for k, v in rec.items()}) + "\n")
                        log.flush()
                        self._report(bar, tb, rec)
                    tick, tick_step = time.time(), step
                    if self._agree_to_stop():
                        break
                elif bar is not None:
                    bar.update(1)
                if self.step % t.checkpoint_every == 0 and self.step < t.steps:
                    self.save_checkpoint()
        finally:
            signal.signal(signal.SIGTERM, previous)
            for closable in (log, tb, bar):
                if closable is not None:
                    closable.close()
        if self.stop_requested and self.step < t.steps and self.diverged is None:
            self.save_checkpoint()
            self._barrier()
            if self.main:
                print(f"SIGTERM: checkpoint written at step {self.step}; exiting for requeue", flush=True)
            raise SystemExit(PREEMPTED_EXIT_CODE)
        summary = self.finish() if self.main else {}
        self._barrier()
        return summary

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True

    def finish(self) -> dict:
        cfg = self.cfg
        val_loss = None if self.diverged else self._last_val_loss()
        summary = {
            "study": cfg.study, "variant": cfg.variant, "depth": cfg.model.n_layer, "lr": cfg.optim.lr,
            "seed": cfg.seed, "steps": self.step, "tokens": self.step * self.tokens_per_step,
            "final_val_loss": val_loss,
            "final_val_ppl": math.exp(val_loss) if val_loss is not None and val_loss < 700 else None,
            "initial_loss": self.initial_loss, "diverged": self.diverged is not None,
            "diverged_step": self.diverged["step"] if self.diverged else None,
            "divergence_reason": self.diverged["reason"] if self.diverged else None,
            "params": self.model.num_params(), "params_non_embedding": self.model.num_params(non_embedding=True),
            "attention_params_per_layer": attention_params_by_hand(cfg.model),
            "wall_time_s": self.elapsed, "device": str(self.device), "processes": self.world,
        }
        atomic_write(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        if self.ckpt_path.exists() and not self.cfg.train.keep_checkpoint:
            self.ckpt_path.unlink()
        return summary

    def _last_val_loss(self) -> float | None:
        for line in reversed((self.out / "metrics.jsonl").read_text().splitlines()):
            rec = json.loads(line)
            if rec.get("val_loss") is not None:
                return rec["val_loss"]
        return None

    def _tensorboard(self):
        if not self.cfg.train.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("train.tensorboard is true but the 'tensorboard' package is not installed "
                            "(pip install 'stabilab[tensorboard]')") from None
        return SummaryWriter(str(self.out / "tensorboard"))

    def _progress(self):
        if not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.train.steps, initial=self.step, desc=f"{self.cfg.variant} L{self.cfg.model.n_layer}")

    def _report(self, bar, tb, rec: dict) -> None:
        if tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, float) and math.isfinite(v):
                    tb.add_scalar(k, v, rec["step"])
        if bar is not None:
            bar.update(rec["step"] - bar.n)
            bar.set_postfix(loss=f"{rec['train_loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            return
        line = (f"step {rec['step']}/{self.cfg.train.steps} loss {rec['train_loss']:.4f} "
                f"lr {rec['lr']:.2e} gnorm {rec['grad_norm']:.3f} tok/s {rec['tokens_per_s']:.0f}")
        if "val_loss" in rec:
            line += f" val {rec['val_loss']:.4f}"
        if self.diverged:
            line += f" DIVERGED ({self.diverged['reason']})"
        print(line, flush=True)


def train(cfg: RunConfig, out_dir: str | Path) -> dict:
    try:
        return Trainer(cfg, out_dir).run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
