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

What differs from single runs: a stacked group always trains from step 0 (there is no stacked
checkpoint: a preempted group exits 75 and its unfinished members start again); wall time and peak
memory are the group's (tokens/s: a member's tokens over the group's time); on a GPU the stacked
step's attention kernel may differ from a single run's (cuDNN is left out), so records agree to
kernel rounding there; `provenance.stacked` records the group's size. W&B is refused: its runs are
one per process.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch

from ..config import RunConfig, RuntimeConfig
from ..errors import UserError
from .monitor import StabilityProbe
from .sinks import tracker_names
from .stacked import StackedTrainer
from .trainer import PREEMPTED_EXIT_CODE, Trainer


class StackedRuns:
    def __init__(self, cfgs: list[RunConfig], outs: list[str | Path], runtime: RuntimeConfig | None = None):
        if len(cfgs) != len(outs) or len(set(map(str, outs))) != len(outs):
            raise UserError(f"stacked runs need one distinct output folder per run ({len(cfgs)} runs, "
                            f"{len(set(map(str, outs)))} folders)")
        runtime = runtime or RuntimeConfig()
        if "wandb" in tracker_names(runtime.trackers):
            raise UserError("stacked runs cannot log to wandb (one W&B run per process): train them one by one, "
                            "or use tensorboard or mlflow")
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

    def _finish(self, i: int, status: str) -> dict:
        m = self._load(i)
        summary = m.summarize()
        summary["provenance"]["stacked"] = self.stacked.n
        m.log.close(status, summary)
        m.finish(summary)
        return summary

    def run(self) -> list[dict]:
        t, st = self.stacked.cfgs[0].train, self.stacked
        for m in self.members:
            m.checkpoints.start_afresh(m.config_text)
            m.log = m._sinks()
        summaries: dict[int, dict] = {}
        active = list(range(st.n))
        stop = {"requested": False}
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
        tick, tick_step, elapsed = time.time(), 0, 0.0
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
                if not (logging or evaluating or measure):
                    continue
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
            if stop["requested"] and active:
                for i in active:
                    self.members[i].log.close("preempted", None)
                print(f"SIGTERM: {len(active)} stacked runs stopped at step {st.step}; exiting for requeue "
                      "(they start again from step 0)", flush=True)
                active = []
                raise SystemExit(PREEMPTED_EXIT_CODE)
            for i in active:
                summaries[i] = self._finish(i, "finished")
            active = []
        finally:
            signal.signal(signal.SIGTERM, previous)
            for i in active:  # an exception: the unfinished members' sinks end as a failed run's do
                self.members[i].log.close("failed", None)
        return [summaries[i] for i in range(st.n)]


def train_stacked(cfgs: list[RunConfig], outs: list[str | Path], runtime: RuntimeConfig | None = None) -> list[dict]:
    return StackedRuns(cfgs, outs, runtime).run()
