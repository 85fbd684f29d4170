#!/usr/bin/env python3
"""Train one run of a preset under torch.compile's default mode and under another (CUDA graphs:
reduce-overhead), and compare them: every logged number, record by record, and the speed. This is
the check that a compile mode keeps a run's numerics.

The default mode trains twice (unless --no-floor): two runs of the same mode differ too on a GPU
(atomic adds in the backward), so the second gives the run-to-run floor that the mode's
difference is judged against. Every training goes through the pipeline's own launch path
(`stabilab train --run ... --runtime ...`, as bench_grid.py and the Snakemake rules run them), into
`<out>/<mode>/` (and `<out>/default-repeat/`); `<out>/compare.md` lists, per logged quantity, the
largest difference |a - b| / (1 + |b|) over the records and where it is, for the mode against
the default and for the default against its repeat, then each training's wall time, tokens/s
and peak memory. At an LR near the edge the runs are chaotic and both columns grow large: pick a
stable LR to test agreement.

Usage (on a GPU; the preset's data as for bench_grid.py):
    python benchmarks/check_compile_mode.py --config configs/two_instabilities.yaml --study lr \\
        --variant baseline --lr 0.01 --mode reduce-overhead --out benchmarks/results/h200_compile_mode \\
        train.steps=300
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import bench_grid  # same folder: the data rules and the launch path
from stabilab.config import parse_overrides
from stabilab.experiment import Run, load_experiment, run_config, shards_dir
from stabilab.layout import RESULTS

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="experiment config (a preset)")
    p.add_argument("--study", required=True)
    p.add_argument("--variant", required=True)
    p.add_argument("--depth", type=int, default=None, help="the study's first depth unless given")
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", default="reduce-overhead", choices=MODES[1:], help="compared with 'default'")
    p.add_argument("--no-floor", action="store_true",
                   help="train the default mode once only (no run-to-run floor)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="folder for the two runs and compare.md")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="experiment-config overrides")
    return p.parse_args(argv)


def read_records(folder: Path) -> dict[int, dict]:
    """metrics.jsonl by step."""
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec for rec in map(json.loads, filter(None, lines))}


def differences(a: dict[int, dict], b: dict[int, dict]) -> list[dict]:
    """Per quantity logged in both: the largest |a - b| / (1 + |b|) over the steps both logged,
    and its step (speed columns left out: they differ by design). A value finite in one and not
    the other (metrics.jsonl writes NaN and inf as null) counts as an infinite difference, and so
    do steps logged by one run only (one stopped, diverged, earlier): the row `steps logged`."""
    skip = {"step", "tokens", "tokens_per_s"}
    rows = {}
    only = sorted(a.keys() ^ b.keys())
    if only:
        rows["steps logged"] = {"quantity": "steps logged", "max_rel_diff": math.inf, "at_step": only[0]}
    number = lambda v: math.nan if v is None else v  # noqa: E731
    for step in sorted(a.keys() & b.keys()):
        for key in (a[step].keys() & b[step].keys()) - skip:
            x, y = number(a[step][key]), number(b[step][key])
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not isinstance(y, (int, float)):
                continue
            if math.isnan(x) and math.isnan(y):
                d = 0.0
            elif math.isfinite(x) and math.isfinite(y):
                d = abs(x - y) / (1 + abs(y))
            else:
                d = 0.0 if x == y else math.inf
            if key not in rows or d > rows[key]["max_rel_diff"]:
                rows[key] = {"quantity": key, "max_rel_diff": d, "at_step": step}
    return sorted(rows.values(), key=lambda r: -r["max_rel_diff"])


REPEAT = "default-repeat"  # the default mode's second training: the run-to-run floor


def train_all(args, out: Path, spec: Path, cfg: dict) -> dict[str, dict]:
    """The run under the default mode, under --mode, then (the floor) under the default again:
    their summaries by folder name."""
    summaries = {}
    for name in ("default", args.mode, *([] if args.no_floor else [REPEAT])):
        mode = "default" if name == REPEAT else name
        runtime = out / f"runtime_{mode}.json"
        runtime.write_text(json.dumps({**(cfg.get("runtime") or {}), "compile_mode": mode}))
        code = bench_grid.run_cli(["train", "--run", str(spec), "--out", str(out / name), "--runtime", str(runtime),
                                   "--threads", str(args.threads)], out / f"{name}.log")
        if code != 0:
            raise SystemExit(f"the {name} run exited {code}: see {out / f'{name}.log'}")
        summaries[name] = json.loads((out / name / "summary.json").read_text())
    return summaries


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    cfg = load_experiment(args.config, parse_overrides(args.overrides))
    if args.study not in cfg.get("studies", {}):
        raise SystemExit(f"unknown study '{args.study}' in {args.config}")
    depth = args.depth if args.depth is not None else cfg["studies"][args.study]["depths"][0]
    run = Run(args.study, args.variant, int(depth), args.lr, args.seed)
    bench_grid.prepare_data(cfg, bench_grid.REPO / RESULTS.format(name=cfg["name"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "run.json"
    spec.write_text(json.dumps(run_config(cfg, run, shards_dir(cfg)), sort_keys=True))
    bench_grid.CHILDREN = bench_grid.Children()  # a SIGTERM reaches the run in flight
    with bench_grid.sigterm_to_children():
        summaries = train_all(args, out, spec, cfg)
    default = read_records(out / "default")
    rows = differences(read_records(out / args.mode), default)
    floor = {} if args.no_floor else {r["quantity"]: r for r in differences(read_records(out / REPEAT), default)}
    floor_head = ("", "") if args.no_floor else (" default vs repeat (floor) | at step |", "---|---|")
    lines = [f"# {args.mode} against default: {run.path} of {args.config}", "",
             "max |a - b| / (1 + |b|) over the records, and its step"
             + ("" if args.no_floor else "; the floor: the default mode against its own repeat"), "",
             "| quantity | mode vs default | at step |" + floor_head[0], "|---|---|---|" + floor_head[1]]
    for r in rows:
        line = f"| {r['quantity']} | {r['max_rel_diff']:.3g} | {r['at_step']} |"
        if not args.no_floor:
            f = floor.get(r["quantity"])
            line += f" {f['max_rel_diff']:.3g} | {f['at_step']} |" if f else " — | — |"
        lines.append(line)
    lines += ["", "| training | wall time (s) | tokens/s | peak memory (GiB) | final val loss |",
              "|---|---|---|---|---|"]
    for name, s in summaries.items():
        lines.append(f"| {name} | {s['wall_time_s']:.1f} | {s['tokens'] / max(s['wall_time_s'], 1e-9):,.0f} | "
                     f"{s.get('peak_memory_gib')} | {s.get('final_val_loss')} |")
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return rows


if __name__ == "__main__":
    main()
