"""What a dry run (`snakemake -n`) would train, per study, and why; fed with Snakemake's job_info
records by the `stabilab` logger plugin, which prints it at the dry run's end:

    Would train 40 runs:
      depth     12  (config changed)
      lr        15  (12 config changed, 3 new)
      grokking   4  (new)
    Changed since the run folders' config.json:
      train.steps: 150 -> 20  (33 runs: depth, lr, variants)
    Cost of these runs:
      depth     12 runs   1.84M tokens  2.87 TFLOP
      ...

(the cost lines are `stabilab check-config`'s, stabilab.cost, for the runs that would train).

Why: 'new' (no summary.json), 'unfinished' (a config.json but no summary.json yet), 'config changed'
(its config.json differs from the run config the job would get: the keys below, one line per set
of changes), else Snakemake's own reason in a word or two (input updated, code changed, forced).
Pure bookkeeping, no Snakemake or heavy imports, so that it is tested on synthetic records.
"""

from __future__ import annotations

import json
import shlex
from collections import Counter
from pathlib import Path

from .layout import GROK_RUN_DIR, RUN_NAME
from .progress import GROK_FIELDS, RUN_FIELDS

GROKKING = "grokking"  # the study name the grokking runs are counted under
MAX_CHANGE_LINES = 10
# Snakemake's reasons (jobs.Reason.__str__), first match wins, in a word or two
REASONS = (("Forced execution", "forced"), ("Incomplete output files", "unfinished"),
           ("Params have changed", "config changed"), ("Code has changed", "code changed"),
           ("Software environment", "software changed"), ("Updated input files", "input updated"),
           ("Input files updated by another job", "input updated"), ("Set of input files", "input updated"))


def snakemake_reason(reason: str) -> str:
    return next((word for prefix, word in REASONS if prefix in (reason or "")), "other")


def run_config_of(shellcmd: str | None) -> dict | None:
    """The resolved run config a train job's command passes (`--run '<json>'`), or None."""
    try:
        words = shlex.split(shellcmd or "")
        return json.loads(words[words.index("--run") + 1])
    except (ValueError, IndexError):
        return None


class DryRun:
    """`observe` takes each job_info record's fields, `lines` says what would train."""

    def __init__(self):
        self.why: dict[str, Counter] = {}  # study -> why -> runs
        self.changes: dict[tuple[str, ...], list[tuple[str, str]]] = {}  # changes -> [(study, run)]
        self.configs: dict[str, list[dict]] = {}  # study -> the resolved configs of its runs that would train
        self.results: Path | None = None  # results/<name>, from the run folders

    def observe(self, fields: dict) -> None:
        wildcards = {k: str(v) for k, v in (fields.get("wildcards") or {}).items()}
        outputs = fields.get("output") or []
        if set(wildcards) == RUN_FIELDS:
            study, name = wildcards["study"], RUN_NAME.format(**wildcards)
        elif set(wildcards) == GROK_FIELDS:
            study, name = GROKKING, GROK_RUN_DIR.format(**wildcards)
        else:
            return
        folder = Path(str(outputs[0]).split(" (")[0]).parent if outputs else None
        why = self._why(study, name, folder, fields)
        self.why.setdefault(study, Counter())[why] += 1
        if study != GROKKING and (run := run_config_of(fields.get("shellcmd"))) is not None:
            self.configs.setdefault(study, []).append(run)
            if folder is not None and len(folder.parents) > 4:  # results/<name>/runs/<study>/<variant>/<run>
                self.results = folder.parents[3]

    def _why(self, study: str, name: str, folder: Path | None, fields: dict) -> str:
        if folder is None or not (folder / "summary.json").exists():
            return "unfinished" if folder is not None and (folder / "config.json").exists() else "new"
        new = run_config_of(fields.get("shellcmd")) if study != GROKKING else None
        if new is not None:
            try:
                from .experiment import config_changes  # pydantic: only on a dry run

                changes = config_changes(json.loads((folder / "config.json").read_text()), new)
            except Exception:  # an unreadable config.json, a config this version cannot read
                changes = []
            if changes:
                self.changes.setdefault(tuple(changes), []).append((study, name))
                return "config changed"
        return snakemake_reason(fields.get("reason"))

    def lines(self) -> list[str]:
        if not self.why:
            return []
        total = sum(sum(c.values()) for c in self.why.values())
        width = max(len(s) for s in self.why)
        digits = len(str(max(sum(c.values()) for c in self.why.values())))
        out = [f"Would train {total} run{'s' * (total != 1)}:"]
        for study, why in sorted(self.why.items(), key=lambda item: (item[0] == GROKKING, item[0])):
            n = sum(why.values())
            parts = [w for w, _ in why.most_common()] if len(why) == 1 else \
                [f"{k} {w}" for w, k in why.most_common()]
            out.append(f"  {study:<{width}} {n:>{digits}}  ({', '.join(parts)})")
        if self.changes:
            out.append("Changed since the run folders' config.json:")
            groups = sorted(self.changes.items(), key=lambda item: -len(item[1]))
            for changes, members in groups[:MAX_CHANGE_LINES]:
                who = members[0][1] if len(members) == 1 else \
                    f"{len(members)} runs: {', '.join(sorted({s for s, _ in members}))}"
                out.append(f"  {', '.join(changes)}  ({who})")
            if len(groups) > MAX_CHANGE_LINES:
                out.append(f"  ... and {len(groups) - MAX_CHANGE_LINES} more sets of changes")
        return out + self.cost_lines()

    def cost_lines(self) -> list[str]:
        """What the runs that would train cost (check-config's lines); [] when that cannot be said."""
        if not self.configs:
            return []
        try:
            from .cost import dry_run_lines  # torch (meta device): only at a dry run's end

            name = self.results.name if self.results is not None else ""
            device = "auto"
            if self.results is not None and (self.results / "runtime.json").exists():
                device = json.loads((self.results / "runtime.json").read_text()).get("device", "auto")
            return dry_run_lines(dict(sorted(self.configs.items())), name, device)
        except Exception as e:  # a cost that cannot be computed never hides the plan
            return [f"(no cost: {type(e).__name__}: {e})"]
