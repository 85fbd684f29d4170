"""Train one run: from a resolved RunConfig into a run folder.

Outputs: config.json (resolved), metrics.jsonl, ckpt.pt (while running, resumable),
summary.json (written last and atomically: a folder without it is an unfinished run). On steps
that neither log nor measure, the loop never waits for the device.

The trainer is assembled from parts: `Checkpointer` (save, load, folder preparation),
`RunningStats` / `DivergenceMonitor` / `StabilityProbe` (monitoring), `RunLog` (JSONL, the
console, the trackers of runtime.trackers) and the post-step hooks of the run's methods; `run()` is the loop.

Data parallel: under `torchrun` (WORLD_SIZE > 1) each process takes every WORLD_SIZE-th
micro-batch of the step's `grad_accum` micro-batches, so the global batch, and the batches
themselves, are those of a single-process run. Rank 0 alone evaluates and writes files.

Preemption: on SIGTERM the run stops at the next log step (all ranks agree on it), writes a
checkpoint and exits with PREEMPTED_EXIT_CODE; the next attempt resumes from it. SIGINT (Ctrl-C)
does the same and exits 130; a second Ctrl-C stops at once, without a checkpoint. How each
unfinished attempt ended (a signal, out of GPU memory, an error) goes to attempts.jsonl, and
summary.json's `resumes` says from which step each resume continued and why.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from pathlib import Path

import torch

from ..config import CUDA_GRAPH_MODES, RunConfig, RuntimeConfig
from ..device import autocast, pick_device, provenance, to_device
from ..errors import UserError
from ..io import write_json
from ..methods import post_step_hooks
from ..metrics import grad_group_norms, grad_groups
from ..model import attention_params_by_hand, seeded_model
from ..optim import build_optimizer, lr_at
from ..shards import eval_batches, open_shards, token_counts, train_batch
from .checkpoint import WEIGHTS, Checkpointer, load_weights, save_checked
from .distributed import Processes
from .monitor import DivergenceMonitor, RunningStats, SpikeScores, StabilityProbe, to_floats
from .sinks import ConsoleSink, JSONLSink, RunLog, tracker_names, tracker_sinks

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: checkpoint written on SIGTERM, the job may be requeued
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: checkpoint written on Ctrl-C
STOP_SIGNALS = {signal.SIGTERM: "preempted (SIGTERM)", signal.SIGINT: "interrupted (SIGINT)"}
GRAD_NORMS = "grad_norm.csv"  # step,grad_norm for every step (train.spike_scores)


class Trainer:
    def __init__(self, cfg: RunConfig, out_dir: str | Path, runtime: RuntimeConfig | None = None):
        self.runtime = runtime or RuntimeConfig()
        self.trackers = tracker_names(self.runtime.trackers)  # STABILAB_TRACKERS checked before any file is touched
        self.out = Path(out_dir)
        t = cfg.train
        self.procs = Processes()
        if self.procs.world > 1 and t.grad_accum % self.procs.world:
            raise UserError(f"train.grad_accum ({t.grad_accum}) must be a multiple of the process count "
                            f"({self.procs.world})")
        self.device = pick_device(self.runtime.device, self.procs.local_rank)
        self.procs.init(self.device)
        self.compiled = self.runtime.compiles_on(self.device)
        if self.procs.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.meta, data = open_shards(cfg.data.shards, cfg.data.tokenizer, cfg.data.vocab_size,
                                      cfg.data.tokenizer_file or None)
        self.train_tokens = data["train"]
        # the run's config with the vocabulary filled in (the caller's config is left as it was)
        self.cfg = cfg.with_vocab(self.meta["tokenizer"]["vocab_size"])
        self.model = seeded_model(self.cfg.model, cfg.seed, self.device)
        if t.init_from:  # a finished run's weights instead of a fresh init (same architecture)
            self.load_init(t.init_from)
        self.masked_token_ids = self.mask_unseen_tokens()
        self.forward = self.model
        if self.procs.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(self.model, device_ids=[self.device.index]
                                                   if self.device.type == "cuda" else None)
        # Model and fused head loss compile as one graph (its forward and written-out backward
        # become one reduction and one elementwise kernel over the logits); SPAM's and perpGrad's
        # updates compile to a fused kernel per tensor; the metrics pass compiles with the model.
        self.compile_mode = self.runtime.compile_mode_on(self.device, self.procs.world) if self.compiled else None
        self.loss_fn = torch.compile(self._loss, mode=self.compile_mode) if self.compiled else self._loss
        # with CUDA graphs the outputs of one call live in memory the next call reuses: mark each call
        self.graphs = self.compile_mode in CUDA_GRAPH_MODES and self.device.type == "cuda"
        self.opt = build_optimizer(self.model, self.cfg.optim, self.device, compile=self.compiled)
        self.hooks = post_step_hooks(self.cfg)
        self.val_batches = [self.to_device(x, y) for x, y in eval_batches(data["val"], t.eval_batches, t.batch_size,
                                                                  self.cfg.model.block_size)]
        self.probe = StabilityProbe(self.model, self.cfg, self.device, self.val_batches[0], self.compiled)
        self.groups = grad_groups(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.stats = RunningStats.zeros(t.grad_var_window, self.device)
        self.spike_scores = SpikeScores(self.model, t.spike_factor, self.device, self.compiled) \
            if t.spike_scores else None
        self.recent_grad_norms: list[torch.Tensor] = []  # steps since the last record (spike_scores)
        self.divergence = DivergenceMonitor(t.divergence, t.log_every)
        self.checkpoints = Checkpointer(self.out, self.device)
        self.step = 0
        self.lr = 0.0
        self.elapsed = 0.0
        self.stop_requested = False
        self.stop_signal: int | None = None  # the first SIGTERM or SIGINT received, and when
        self.stop_time = 0.0
        self.tracker_ids: dict[str, str] = {}  # the trackers' run ids, kept in the checkpoint (a resume continues them)

    def load_init(self, path: str) -> None:
        """train.init_from: a finished run's weights; of another architecture, one line naming the
        model settings that differ (not load_state_dict's list of every mismatched tensor)."""
        saved = load_weights(path, self.device)
        state = {k: v for k, v in saved["model"].items() if k != "vocab_mask"}  # a mask is not a weight:
        if self.cfg.model.mask_unseen_tokens:  # the run's own is set from its split after this
            state["vocab_mask"] = self.model.vocab_mask
        try:
            self.model.load_state_dict(state)
        except RuntimeError as e:
            theirs, ours = (saved.get("config") or {}).get("model") or {}, self.cfg.model.to_dict()
            diff = [f"model.{k} {theirs[k]!r} there, {v!r} here" for k, v in ours.items()
                    if k in theirs and theirs[k] != v]
            what = "; ".join(diff) or " ".join(str(e).split())[:300]
            raise UserError(f"train.init_from: {path} holds weights of another architecture ({what})") from None

    def mask_unseen_tokens(self) -> int | None:
        """model.mask_unseen_tokens: the ids that never occur in train.bin masked in the model (its
        `vocab_mask`, after any init_from: the run's own split decides); the count, None when off."""
        if not self.cfg.model.mask_unseen_tokens:
            return None
        seen = torch.from_numpy(token_counts(self.train_tokens, self.cfg.model.vocab_size) > 0)
        n = self.model.mask_unseen(seen)
        if self.procs.is_main:
            print(f"model.mask_unseen_tokens: {n} of {self.cfg.model.vocab_size} token ids never occur in the "
                  f"training split: masked (softmax, mu, mu-loss, mu-centering, vocabulary metrics)", flush=True)
        return n

    # ------------------------------------------------------------------ data

    def to_device(self, x: torch.Tensor, y: torch.Tensor):
        """A host batch on the run's device (benchmarks/bench_throughput.py overrides it)."""
        return to_device(self.device, x, y)

    @property
    def tokens_per_step(self) -> int:
        """The global batch in tokens (all processes, all micro-batches)."""
        t = self.cfg.train
        return t.batch_size * t.grad_accum * self.cfg.model.block_size

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> None:
        self.flush_grad_norms()  # the file must hold every step up to the checkpoint
        if self.procs.is_main:
            d = self.divergence
            self.checkpoints.save({
                "step": self.step, "initial_loss": d.initial_loss, "above_steps": d.above_steps,
                "elapsed": self.elapsed, "stats": self.stats.state_dict(),
                "spike_scores": self.spike_scores.state_dict() if self.spike_scores is not None else None,
                "trackers": self.tracker_ids, "model": self.model.state_dict(), "optimizer": self.opt.state_dict()})

    @property
    def config_text(self) -> str:
        """config.json's text: the resolved run config (a checkpoint resumes only under the same)."""
        return json.dumps(self.cfg.to_dict(), indent=2) + "\n"

    def prepare_folder(self) -> bool:
        """Resume from the checkpoint of the same config, else start the folder afresh."""
        config = self.config_text
        if self.checkpoints.same_config(config):
            state = self.checkpoints.load()
            if state is not None:
                self.resume_from(state)
                if self.procs.is_main:
                    self.checkpoints.note(resumed=self.step)
                return True
        self.procs.barrier()  # no rank may still be reading an old checkpoint
        if self.procs.is_main:
            self.checkpoints.start_afresh(config)
        return False

    def resume_from(self, state: dict) -> None:
        """Continue from a checkpoint's state (save_checkpoint's): weights, optimizer, step, running
        statistics and monitors; the records the lost attempt wrote after it are dropped."""
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.divergence.initial_loss, self.divergence.above_steps = state["initial_loss"], state["above_steps"]
        self.stats = RunningStats.from_state_dict(state["stats"])
        if self.spike_scores is not None:
            self.spike_scores.load_state_dict(state["spike_scores"])
        self.tracker_ids = state.get("trackers") or {}
        if self.procs.is_main:
            self.checkpoints.truncate_log(self.step)

    # ------------------------------------------------------------------ steps

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward(x, y, self.cfg.loss)

    def train_step(self, measure: bool) -> dict[str, torch.Tensor]:
        """One optimizer step; with `measure`, also the per-group gradient norms and SPAM's
        clipped fraction. Returns device tensors (no host sync)."""
        cfg, t, procs = self.cfg, self.cfg.train, self.procs
        self.lr = lr_at(self.step, cfg.optim, t.steps)
        for group in self.opt.param_groups:
            group["lr"] = self.lr
        micro_batches = range(procs.rank, t.grad_accum, procs.world)  # this process's share
        for i, micro in enumerate(micro_batches):
            x, y = self.to_device(*train_batch(self.train_tokens, cfg.seed, self.step, micro, t.batch_size,
                                               cfg.model.block_size))
            sync = procs.world == 1 or i == len(micro_batches) - 1  # all-reduce gradients once per step
            if self.graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with autocast(self.device, t.dtype), (contextlib.nullcontext() if sync else self.forward.no_sync()):
                loss, ce = self.loss_fn(x, y)
                # DDP averages over processes: scale so the result is the mean over all micro-batches
                (loss * procs.world / t.grad_accum).backward()
            if self.graphs and i == 0 and len(micro_batches) > 1:
                # the first backward's gradients became the .grad tensors, in the graph's memory,
                # which the next micro-batch's replay overwrites: give them memory of their own
                # (later micro-batches then accumulate into it in place)
                for p in self.params:
                    if p.grad is not None:
                        p.grad = p.grad.clone()
            self.stats.loss_sum += ce.detach()
        self.stats.loss_n += len(micro_batches)
        if self.spike_scores is not None:
            self.spike_scores.record()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True).float()
        out = {"grad_norm": grad_norm}
        if measure:
            out.update(grad_group_norms(self.groups))
            self.opt.count_clipped = True
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        for hook in self.hooks:
            hook(self.model)
        self.stats.record_grad_norm(grad_norm, self.step, t.spike_factor)
        if self.spike_scores is not None:
            self.recent_grad_norms.append(grad_norm)
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
        for x, y in self.val_batches:
            with autocast(self.device, self.cfg.train.dtype):
                total += self.model(x, y, self.cfg.loss)[1]
        self.model.train()
        return (total / len(self.val_batches)).item()

    def stability_metrics(self) -> dict[str, torch.Tensor]:
        """METHODS.md §3 on the fixed metrics batch (device tensors)."""
        return self.probe.measure(self.stats, self.step)

    def log_record(self, step: int, out: dict, measure: bool, evaluating: bool, seconds: float,
                   steps_done: int) -> dict:
        """Gather one metrics record (the only place the loop waits for the device)."""
        s = self.stats
        loss = self.procs.sum_(torch.stack([s.loss_sum, torch.tensor(float(s.loss_n), device=self.device)]))
        values = {"train_loss": loss[0] / loss[1].clamp(min=1), **out}
        s.loss_sum.zero_()
        s.loss_n = 0
        if self.procs.is_main and measure:
            values.update(self.stability_metrics())
        if self.spike_scores is not None:
            values.update(self.spike_scores.values())
        values = to_floats(values)  # the record's one wait for the device
        self.flush_grad_norms()
        rec = {"step": step, "tokens": step * self.tokens_per_step, "train_loss": values.pop("train_loss"),
               "lr": self.lr, **values}
        if self.procs.is_main and evaluating:
            rec["val_loss"] = self.evaluate()
        rec["tokens_per_s"] = steps_done * self.tokens_per_step / max(seconds, 1e-9)
        return rec

    def write_record(self, log: RunLog, step: int, rec: dict) -> dict | None:
        """Judge the record (the divergence monitor), write it to the sinks; returns the verdict."""
        self.divergence.check(step, rec["train_loss"])
        verdict = self.divergence.verdict
        log.write(rec, f" DIVERGED ({verdict['reason']})" if verdict else "")
        return verdict

    def flush_grad_norms(self) -> None:
        """Append the total grad norms of the steps since the last flush to grad_norm.csv."""
        if self.recent_grad_norms and self.procs.is_main:
            norms = torch.stack(self.recent_grad_norms).tolist()
            first = self.step - len(norms) + 1
            with open(self.out / GRAD_NORMS, "a") as f:
                f.writelines(f"{first + i},{v!r}\n" for i, v in enumerate(norms))
        self.recent_grad_norms = []

    def _agree_to_stop(self) -> bool:
        """All ranks stop together: on divergence (rank 0's verdict) or any rank's SIGTERM."""
        d = self.divergence
        if self.procs.world == 1:
            return self.stop_requested or d.verdict is not None
        flags = self.procs.max_(torch.tensor([float(self.stop_requested), float(d.verdict is not None)],
                                             device=self.device))
        self.stop_requested = bool(flags[0])
        if flags[1] and d.verdict is None:
            d.verdict = {"step": self.step, "reason": "diverged (rank 0)"}
        return bool(flags.max())

    # ------------------------------------------------------------------ loop

    def _sinks(self) -> RunLog:
        if not self.procs.is_main:
            return RunLog([])
        trackers = tracker_sinks(self.trackers, self.out, self.cfg, self.tracker_ids)
        log = RunLog([JSONLSink(self.out), *trackers,
                      ConsoleSink(self.cfg.train.steps, self.step, f"{self.cfg.variant} L{self.cfg.model.n_layer}")])
        self.tracker_ids = log.run_ids()
        return log

    def run(self) -> dict:
        t = self.cfg.train
        resumed = self.prepare_folder()
        if resumed and self.procs.is_main:
            print(f"resumed from step {self.step}", flush=True)
        log = self._sinks()
        previous = handle_stop_signals(self._on_stop_signal)
        tick, tick_step = time.time(), self.step
        status, summary = "failed", None  # how the sinks are closed: an exception leaves it failed
        try:
            while self.step < t.steps:
                step = self.step + 1  # the step about to complete
                measure, logging, evaluating = t.schedule(step)
                out = self.train_step(measure)
                if logging or evaluating or measure:
                    now = time.time()
                    self.elapsed += now - tick
                    rec = self.log_record(step, out, measure, evaluating, now - tick, step - tick_step)
                    if self.procs.is_main:
                        self.write_record(log, step, rec)
                    tick, tick_step = time.time(), step
                    if self._agree_to_stop():
                        break
                else:
                    log.tick()
                if t.checkpoints_at(self.step):
                    self.save_checkpoint()
            if self.stop_requested and self.step < t.steps and self.divergence.verdict is None:
                status = "preempted"
            else:
                summary = self.summarize() if self.procs.is_main else None
                status = "diverged" if self.divergence.verdict else "finished"
        except BaseException as e:  # out of GPU memory, a fault, a second Ctrl-C: the next attempt's resume says so
            self.note_stopped(stop_reason(e))
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            log.close(status, summary)  # the trackers get the summary before summary.json marks the run finished
        if status == "preempted":
            self.save_checkpoint()
            self.note_stopped(STOP_SIGNALS.get(self.stop_signal, "preempted"))
            self.procs.barrier()
            if self.procs.is_main:
                print(stopped_line(self.stop_signal, f"checkpoint written at step {self.step}"), flush=True)
            raise SystemExit(INTERRUPTED_EXIT_CODE if self.stop_signal == signal.SIGINT else PREEMPTED_EXIT_CODE)
        if self.procs.is_main:
            self.finish(summary)
        self.procs.barrier()
        return summary or {}

    def _on_stop_signal(self, signum, frame) -> None:
        if second_ctrl_c(signum, self.stop_signal, self.stop_time):
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (the last periodic checkpoint is kept)
        self.stop_requested = True
        if self.stop_signal is None:
            self.stop_signal, self.stop_time = signum, time.monotonic()
        if signum == signal.SIGINT and self.procs.is_main:
            print("Ctrl-C: stopping at the next log step with a checkpoint (Ctrl-C again: stop now)", flush=True)

    def note_stopped(self, reason: str) -> None:
        """attempts.jsonl: this attempt ends unfinished at self.step, for this reason."""
        if self.procs.is_main and self.out.is_dir():
            self.checkpoints.note(stopped=self.step, reason=reason)

    def summarize(self) -> dict:
        """summary.json's contents: the run's outcome, sizes and provenance."""
        cfg, verdict = self.cfg, self.divergence.verdict
        val_loss = None if verdict else self._last_val_loss()
        return {
            "study": cfg.study, "variant": cfg.variant, "depth": cfg.model.n_layer, "lr": cfg.optim.lr,
            "seed": cfg.seed, "steps": self.step, "tokens": self.step * self.tokens_per_step,
            "resumes": self.checkpoints.resumes(),  # [] for a run trained in one attempt
            "final_val_loss": val_loss,
            "final_val_ppl": math.exp(val_loss) if val_loss is not None and val_loss < 700 else None,
            "initial_loss": self.divergence.initial_loss, "diverged": verdict is not None,
            "diverged_step": verdict["step"] if verdict else None,
            "divergence_reason": verdict["reason"] if verdict else None,
            "params": self.model.num_params(), "params_non_embedding": self.model.num_params(non_embedding=True),
            "attention_params_per_layer": attention_params_by_hand(cfg.model),
            "wall_time_s": self.elapsed, "device": str(self.device), "processes": self.procs.world,
            "vocab_size": cfg.model.vocab_size, "flops_per_token": self.model.flops_per_token(),
            **({"masked_token_ids": self.masked_token_ids} if self.masked_token_ids is not None else {}),
            "peak_memory_gib": (torch.cuda.max_memory_allocated(self.device) / 2**30
                                if self.device.type == "cuda" else None),
            "provenance": {**provenance(self.device), "compiled": self.compiled, "compile_mode": self.compile_mode,
                           "tokenizer_sha256": self.meta["tokenizer"].get("sha256")},
        }

    def finish(self, summary: dict) -> None:
        """Write the final weights (runtime.keep_weights), then summary.json; drop the checkpoint."""
        cfg = self.cfg
        if self.runtime.keep_weights:  # before the summary, which marks the run finished
            save_checked({"model": self.model.state_dict(), "config": cfg.to_dict(), "step": self.step},
                         self.out / WEIGHTS)
        write_json(self.out / "summary.json", summary)
        if not self.runtime.keep_checkpoint:
            self.checkpoints.remove()

    def _last_val_loss(self) -> float | None:
        for line in reversed((self.out / "metrics.jsonl").read_text().splitlines()):
            rec = json.loads(line)
            if rec.get("val_loss") is not None:
                return rec["val_loss"]
        return None


def stop_reason(e: BaseException) -> str:
    """How an exception ends an attempt, in attempts.jsonl's words."""
    if isinstance(e, torch.OutOfMemoryError):
        return "out of GPU memory"
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (SIGINT, twice)"
    if isinstance(e, SystemExit):
        return f"exited ({e.code})"
    return f"error ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"


def handle_stop_signals(handler) -> dict:
    """Install `handler` for SIGTERM and SIGINT; the handlers it replaced, to restore. A SIGINT that the
    process was started ignoring (a background job of a shell, nohup) stays ignored, as it should:
    the terminal's Ctrl-C is not meant for it."""
    return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS
            if not (sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN)}


SAME_CTRL_C_S = 1.0  # a SIGINT this soon after the first is the same Ctrl-C delivered twice (a wrapper relaying it)


def second_ctrl_c(signum: int, first: int | None, first_time: float) -> bool:
    """Whether this SIGINT is a user's second Ctrl-C after a first one (not a duplicate of it)."""
    return signum == signal.SIGINT and first == signal.SIGINT and time.monotonic() - first_time > SAME_CTRL_C_S


def stopped_line(signum: int | None, what: str) -> str:
    """The one line a run stopped by a signal prints: what was kept, and how to go on."""
    if signum == signal.SIGINT:
        return f"interrupted: {what}; run the same command again to resume"
    return f"SIGTERM: {what}; exiting for requeue"


def train(cfg: RunConfig, out_dir: str | Path, runtime: RuntimeConfig | None = None) -> dict:
    try:
        return Trainer(cfg, out_dir, runtime).run()
    finally:
        Processes.shutdown()
