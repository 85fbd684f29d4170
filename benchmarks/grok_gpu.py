#!/usr/bin/env python3
"""Train grokking presets on one GPU: every run of every `--config` at once, one process per run
(`stabilab grok-train --device cuda`), into the pipeline's layout (results/<name>/grokking/<op>/
<variant>/s<seed>), as docs/grokking.md describes; then, unless --no-report, `grok-report` per preset.
Run it under one MPS server (started by the caller) for the processes' kernels to overlap.

    python benchmarks/grok_gpu.py --config configs/grokking_full.yaml configs/grokking_beta2.yaml
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import stabilab  # noqa: F401
except ImportError:  # not installed (e.g. on a bare GPU box): use the checkout's src/
    sys.path.insert(0, str(REPO / "src"))

from stabilab.experiment import grokking_runs, load_experiment
from stabilab.grokking.config import run_subdir
from stabilab.layout import FIGURES, RESULTS

STABILAB = [sys.executable, "-m", "stabilab.cli"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", nargs="+", required=True, help="presets with a grokking: section")
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-report", action="store_true", help="skip grok-report")
    args = p.parse_args(argv)
    jobs, presets = [], []
    for config in args.config:
        exp = load_experiment(config)
        root = REPO / RESULTS.format(name=exp["name"]) / "grokking"
        presets.append((exp["name"], root))
        for spec in grokking_runs(exp):
            out = root / run_subdir(spec)
            if not (out / "summary.json").exists():
                jobs.append((spec, out))
    start = time.time()
    procs = [subprocess.Popen([*STABILAB, "grok-train", "--spec", json.dumps(spec.to_dict()), "--out", str(out),
                               "--device", args.device, "--threads", "1"]) for spec, out in jobs]
    codes = [proc.wait() for proc in procs]
    print(f"grok_gpu: {len(jobs)} runs in {time.time() - start:.0f} s, {sum(c != 0 for c in codes)} failed", flush=True)
    if not args.no_report:
        for name, root in presets:
            subprocess.run([*STABILAB, "grok-report", "--runs", str(root / "add"), "--tables", str(root / "tables"),
                            "--figures", str(REPO / FIGURES.format(name=name) / "grokking")], check=False)
    return int(any(codes))


if __name__ == "__main__":
    sys.exit(main())
