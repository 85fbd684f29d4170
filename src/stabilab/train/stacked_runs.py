"""Stacked runs as pipeline runs: N runs trained by one `StackedTrainer`, each writing its own
run folder (config.json, metrics.jsonl, model.pt, summary.json) with the records a `Trainer`
of that run alone writes, at the same steps.

Each member keeps a `Trainer` for everything but the training step: its folder, sinks, running
statistics, divergence monitor, summary and final weights. One measurement model is shared by all
members: at the steps that measure or evaluate, a member's weights are copied into it and its
`Trainer.log_record` runs as in a single run (METHODS.md §3 metrics, validation loss). A member
that diverges is finished there (summary.json with its verdict) and frozen in the stack.

A member whose loss or gradient goes non-finite is frozen in the stack; from then on it is recorded
as the run alone, whose weights went NaN there, is: NaN losses, norms and metrics, NaN weights.

Checkpoints: every `train.checkpoint_every` steps and on SIGTERM, each unfinished member writes
the checkpoint its run alone would write (`Trainer.save_checkpoint`'s format: its weights, an
AdamW state dict of its moments, its running statistics and monitors). A preempted group resumes
where it stopped when all its members' checkpoints are of one step; members at different steps
(a retry that regrouped them, a stop between two members' saves) train one by one, each from its
own checkpoint. Any member can also be resumed alone by `stabilab train`.

What differs from single runs: wall time and peak memory are the group's (tokens/s: a member's
tokens over the group's time); on a GPU the stacked step's attention kernel may differ from a
single run's (cuDNN is left out), so records agree to kernel rounding there; `provenance.stacked`
records the group's size. W&B is refused: its runs are one per process.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch

from ..config import RunConfig, RuntimeConfig
from ..errors import UserError
from ..optim import build_optimizer
from .checkpoint import checkpoint_step
from .monitor import StabilityProbe
from .sinks import tracker_names
from .stacked import StackedTrainer
from .trainer import (
    INTERRUPTED_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    STOP_SIGNALS,
    Trainer,
    handle_stop_signals,
    second_ctrl_c,
    stop_reason,
    stopped_line,
)


class StackedRuns:
    def __init__(self, cfgs: list[RunConfig], outs: list[str | Path], runtime: RuntimeConfig | None = None):
        if len(cfgs) != len(outs) or len(set(map(str, outs))) != len(outs):
            raise UserError(f"stacked runs need one distinct output folder per run ({len(cfgs)} runs, "
                            f"{len(set(map(str, outs)))} folders)")
        runtime = runtime or RuntimeConfig()
        if "wandb" in tracker_names(runtime.trackers):
            raise UserError("stacked runs cannot log to wandb (one W&B run per process): train them one by one, "
                            "or use tensorboard or mlflow")
        self.runs = list(zip(cfgs, outs))  # as given: trained one by one if the stack cannot resume
        self.runtime = runtime
        self.stacked = StackedTrainer(cfgs, runtime)
        # the members' own Trainers are never stepped or compiled: they keep folders, logs and verdicts
        eager = runtime.model_copy(update={"compile": False})
        self.members = [Trainer(c, o, eager) for c, o in zip(cfgs, outs)]
        shared = self.members[0]
        self.probe = StabilityProbe(shared.model, shared.cfg, shared.device, shared.val_batches[0],
                                    self.stacked.compiled)
        for m in self.members:  # one measurement model for all members: their weights go into it in turn
            m.model = m.forward = shared.model
            m.probe, m.compiled = self.probe, self.stacked.compiled
            m.opt, m.params, m.groups = None, [], {}  # the member's own model and optimizer are freed

    def _load(self, i: int) -> Trainer:
        """Member i's weights in the shared model: NaN once it is frozen, as the run alone's are."""
        m = self.members[i]
        m.model.load_state_dict(self.stacked.member_state_dict(i))
        if not bool(self.stacked.alive[i]):
            with torch.no_grad():
                for p in m.model.parameters():
                    p.fill_(float("nan"))
        return m

    def _optimizer(self, i: int) -> torch.optim.Optimizer:
        """The optimizer member i's run alone has, over the shared model (no state yet)."""
        m = self.members[i]
        return build_optimizer(m.model, self.stacked.cfgs[i].optim, m.device)

    def _stacked_index(self) -> list[tuple[torch.nn.Parameter, int]]:
        """The shared model's parameters, each with its index among the stacked tensors."""
        index = {name: j for j, name in enumerate(self.stacked.names)}
        return [(p, index[f"gpt.{name}"]) for name, p in self.members[0].model.named_parameters()]

    def _save(self, i: int, step: int, elapsed: float) -> None:
        """Member i's checkpoint, in the format of its run alone."""
        st, m = self.stacked, self._load(i)
        opt = self._optimizer(i)
        # AdamW's own step counter dtype (float64 under a float64 default, else float32)
        dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        for p, j in self._stacked_index():  # copies on the host: a view would save the whole stacked tensor
            opt.state[p] = {"step": torch.tensor(float(step), dtype=dtype), "exp_avg": st.exp_avgs[j][i].cpu(),
                            "exp_avg_sq": st.exp_avg_sqs[j][i].cpu()}
        m.opt, m.step, m.elapsed = opt, step, elapsed
        m.save_checkpoint()
        m.opt = None

    @staticmethod
    def _checkpoint_step(m: Trainer) -> int | None:
        """The step of a member's checkpoint of its own config, None: none."""
        return checkpoint_step(m.out) if m.checkpoints.same_config(m.config_text) else None

    def _resume(self) -> bool | None:
        """All members from their checkpoints when each has one of the same step (the group writes
        them together): True; none has one: False (a fresh start); else None: the stack cannot
        hold members at different steps (a regrouped retry, or a stop between two members' saves)."""
        st = self.stacked
        steps = [self._checkpoint_step(m) for m in self.members]
        if all(s is None for s in steps):
            for m in self.members:
                m.checkpoints.start_afresh(m.config_text)
            return False
        if len(set(steps)) != 1:
            return None
        with torch.no_grad():
            for i, m in enumerate(self.members):  # one at a time: one member's state on the device at once
                m.opt = self._optimizer(i)
                m.resume_from(m.checkpoints.load())  # into the shared model and this optimizer, then the stack
                m.checkpoints.note(resumed=m.step)
                for p, j in self._stacked_index():
                    st.params[st.names[j]][i].copy_(p)
                    st.exp_avgs[j][i].copy_(m.opt.state[p]["exp_avg"])
                    st.exp_avg_sqs[j][i].copy_(m.opt.state[p]["exp_avg_sq"])
                st.alive[i] = all(bool(torch.isfinite(p).all()) for p in m.model.parameters())
                m.opt = None
        st.step = steps[0]
        return True

    def _one_by_one(self) -> list[dict]:
        """Members whose checkpoints are of different steps: each trains alone, from its own
        checkpoint if it has one, as `stabilab train` would (nothing already trained is lost)."""
        print("stacked runs: their checkpoints are of different steps; training them one by one, each "
              "from its own", flush=True)
        self.stacked = None  # the stack's memory back before the runs alone take theirs
        return [Trainer(cfg, out, self.runtime).run() for cfg, out in self.runs]

    def _finish(self, i: int, status: str) -> dict:
        m = self._load(i)
        summary = m.summarize()
        summary["provenance"]["stacked"] = self.stacked.n
        m.log.close(status, summary)
        m.finish(summary)
        return summary

    def run(self) -> list[dict]:
        t, st = self.stacked.cfgs[0].train, self.stacked
        resumed = self._resume()
        if resumed is None:
            return self._one_by_one()
        if resumed:
            print(f"resumed {st.n} stacked runs from step {st.step}", flush=True)
        for m in self.members:
            m.log = m._sinks()
        summaries: dict[int, dict] = {}
        active = list(range(st.n))
        stop = {"requested": False, "signal": None, "time": 0.0}

        def on_stop_signal(signum, frame):
            if second_ctrl_c(signum, stop["signal"], stop["time"]):
                raise KeyboardInterrupt  # a second Ctrl-C: stop now (the last periodic checkpoints are kept)
            stop["requested"] = True
            if stop["signal"] is None:
                stop.update(signal=signum, time=time.monotonic())

        previous = handle_stop_signals(on_stop_signal)
        tick, tick_step, elapsed = time.time(), st.step, self.members[0].elapsed
        try:
            while st.step < t.steps and active and not stop["requested"]:
                step = st.step + 1
                measure, logging, evaluating = t.schedule(step)
                out = st.train_step(measure)
                out["grad_norm"] = out["grad_norm"].float()  # float32, as Trainer.train_step reports it
                for i in active:
                    m = self.members[i]
                    m.stats.loss_sum += out["ce_sum"][i]
                    m.stats.loss_n += t.grad_accum
                    m.stats.record_grad_norm(out["grad_norm"][i], step - 1, t.spike_factor)
                if logging or evaluating or measure:
                    now = time.time()
                    elapsed += now - tick
                    for i in list(active):
                        m = self._load(i) if (measure or evaluating) else self.members[i]
                        m.step, m.lr, m.elapsed = step, st.lrs[i], elapsed
                        values = {k: v[i] for k, v in out.items() if k.startswith("grad_norm")}
                        rec = m.log_record(step, values, measure, evaluating, now - tick, step - tick_step)
                        if m.write_record(m.log, step, rec):
                            summaries[i] = self._finish(i, "diverged")
                            st.alive[i] = False
                            active.remove(i)
                    tick, tick_step = time.time(), step
                if t.checkpoints_at(step):
                    for i in active:
                        self._save(i, step, elapsed + time.time() - tick)
            if stop["requested"] and active:
                for i in active:
                    self.members[i].log.close("preempted", None)
                    if not t.checkpoints_at(st.step):  # else the loop has just written this step's
                        self._save(i, st.step, elapsed + time.time() - tick)
                    self.members[i].checkpoints.note(stopped=st.step, reason=STOP_SIGNALS[stop["signal"]])
                print(stopped_line(stop["signal"], f"{len(active)} stacked runs stopped at step {st.step}, their "
                                                   "checkpoints written"), flush=True)
                active = []
                raise SystemExit(INTERRUPTED_EXIT_CODE if stop["signal"] == signal.SIGINT else PREEMPTED_EXIT_CODE)
            for i in active:
                summaries[i] = self._finish(i, "finished")
            active = []
        except BaseException as e:  # out of GPU memory, a fault: each unfinished member's next resume says so
            for i in active:
                self.members[i].checkpoints.note(stopped=st.step, reason=stop_reason(e))
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for i in active:  # an exception: the unfinished members' sinks end as a failed run's do
                self.members[i].log.close("failed", None)
        return [summaries[i] for i in range(st.n)]


def train_stacked(cfgs: list[RunConfig], outs: list[str | Path], runtime: RuntimeConfig | None = None) -> list[dict]:
    return StackedRuns(cfgs, outs, runtime).run()
