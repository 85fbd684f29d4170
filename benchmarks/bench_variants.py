#!/usr/bin/env python3
"""Training-step cost of each variant relative to the baseline, in one process, interleaved.

Every variant is a real `stabilab.train.Trainer` built from its resolved run config (the base
sections of config.yaml overlaid by the variant's entry under `variants:`, through
`stabilab.experiment.run_config` and `load_run_config`), all on the same token shards and shapes.
After a warm-up, the script goes round-robin over the variants for `--rounds` rounds (the start
of the round rotates); in each round it times `--steps` calls of `trainer.train_step(False)` per
variant (the device is synchronized before reading the clock), then one "logging step":
`train_step(True)` + `stability_metrics()` + one host transfer of every value, which is what the training
loop does every `train.metrics_every` steps. Reported per variant:

- ms/step: median over rounds of the mean plain-step time;
- vs baseline: median over rounds of the paired ratio variant/baseline of the same round, minus 1;
- logging overhead: (median logging step - median plain step) / (metrics_every * median plain
  step), i.e. the share of training time the METHODS.md section 3 metrics add at that interval.

Defaults are sized for a 2-core CPU (about a minute). Usage: see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import stabilab  # noqa: F401
except ImportError:  # not installed (e.g. on a bare GPU box): use the checkout's src/
    sys.path.insert(0, str(REPO / "src"))

import numpy as np
import torch

from stabilab import corpus, shards, tokenizer
from stabilab.config import RuntimeConfig, deep_merge, load_run_config
from stabilab.experiment import Run, load_experiment, run_config
from stabilab.methods import benchmark_variants
from stabilab.model import padded_vocab
from stabilab.optim import raise_recompile_limit
from stabilab.train import Trainer, to_floats

VARIANTS = benchmark_variants()  # the baseline and every method (methods.py)
DEFAULT_CONFIG = REPO / "config.yaml"

# ----------------------------------------------------------------------------- shared helpers


def build_run_config(experiment: dict, variant: str, overrides: dict, shard_dir: str = "",
                     tokenizer_kind: str = "bpe"):
    """The RunConfig of `variant`: base sections + variant overlay (run_config), then `overrides`."""
    exp = copy.deepcopy(experiment)
    exp["studies"] = {"bench": {"variants": [variant]}}
    n_layer = overrides.get("model", {}).get("n_layer", exp.get("model", {}).get("n_layer", 2))
    lr = exp.get("optim", {}).get("lr", 3e-3)
    run = run_config(exp, Run("bench", variant, n_layer, lr, 0), shard_dir)
    run = deep_merge(run, overrides)
    run["data"] = {"shards": shard_dir, "tokenizer": tokenizer_kind, "vocab_size": 0}
    return load_run_config(run)


def warmup_steps_for(cfg, warmup: int) -> int:
    """SPAM does not clip spikes in its first `grace` steps: warm it up past them so the timed
    steps are steady-state (spike clipping included)."""
    return max(warmup, cfg.optim.spam.grace + 1) if cfg.optim.name == "spam" else warmup


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(out: str | Path | None, stem: str, rows: list[dict], markdown: str) -> None:
    """Write rows as `<out>/<stem>.csv` and the report as `<out>/<stem>.md`."""
    if not out:
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if rows:
        with open(out / f"{stem}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    (out / f"{stem}.md").write_text(markdown + "\n")


def environment_line(device: torch.device) -> str:
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU, {torch.get_num_threads()} torch thread(s)"
    return f"torch {torch.__version__}, {where}"


def parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise SystemExit("--variants: give at least one variant name")
    return names


# ----------------------------------------------------------------------------- data


class RandomTokens:
    """Stand-in tokenizer for `write_shards`: each document becomes uniform random ids in
    [0, vocab_size), about one per 4 characters, ending with the EOT id (vocab_size - 1). For
    vocabularies no tokenizer at hand has; the step time does not depend on token values."""

    kind = "bpe"

    def __init__(self, vocab_size: int, seed: int = 0):
        self.vocab_size, self.eot_id = vocab_size, vocab_size - 1
        self.sha256 = f"random-tokens-{vocab_size}-{seed}"
        self.rng = np.random.default_rng(seed)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.rng.integers(0, self.vocab_size - 1, size=max(1, len(t) // 4)).tolist() for t in texts]


def prepare_shards(workdir: Path, vocab: str, max_chars: int, random_tokens: bool = False) -> tuple[str, dict]:
    """Token shards of the embedded Shakespeare corpus (each play cut to `max_chars` characters),
    through the project's corpus split, tokenizer and shard writer. Returns (folder, meta)."""
    out = workdir / "shards"
    split_dir = workdir / "split"
    text_path = workdir / "corpus.jsonl"
    with open(text_path, "w") as f:
        for doc_id, text in corpus.read_source({"source": "embedded"}):
            f.write(json.dumps({"id": doc_id, "text": text[:max_chars] if max_chars > 0 else text}) + "\n")
    corpus.write_split({"source": "text", "paths": [str(text_path)], "val_fraction": 0.1, "split_seed": 0},
                       split_dir)
    files = {s: split_dir / f"{s}.jsonl.gz" for s in shards.SPLITS}
    if random_tokens:
        if vocab == "gpt2":
            raise SystemExit("--random-tokens needs an integer --vocab")
        tok = RandomTokens(int(vocab))
    elif vocab == "gpt2":
        tok = tokenizer.gpt2()
    else:
        tok = tokenizer.train_bpe(corpus.read_split(files["train"]), int(vocab))
    meta = shards.write_shards(tok, files, out)
    return str(out), meta


# ----------------------------------------------------------------------------- benchmark


def add_common_args(p: argparse.ArgumentParser, config_help: str) -> None:
    """Arguments both benchmark scripts take: which config and variants, on which device, in which dtype."""
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help=config_help)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variant names ('a+b' composes)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="train.dtype (auto: bf16 autocast on CUDA, float32 on CPU)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, "experiment config with base sections and variants")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (0: torch's default); 1 like the pipeline's training jobs, and "
                        "robust on a busy machine, where multi-threaded ops wait for descheduled threads")
    p.add_argument("--n-layer", type=int, default=None, help="default: config.yaml model.n_layer, else 2")
    p.add_argument("--n-embd", type=int, default=None, help="default: config.yaml model.n_embd")
    p.add_argument("--n-head", type=int, default=None, help="default: config.yaml model.n_head")
    p.add_argument("--block-size", type=int, default=None, help="default: config.yaml model.block_size")
    p.add_argument("--batch-size", type=int, default=None, help="default: config.yaml train.batch_size")
    p.add_argument("--vocab", default=None,
                   help="BPE vocab size to train on the corpus, or 'gpt2' (default: config.yaml tokenizer)")
    p.add_argument("--random-tokens", action="store_true",
                   help="shards of uniform random ids over an integer --vocab (no tokenizer needed)")
    p.add_argument("--max-chars", type=int, default=30000,
                   help="characters kept of each play of the embedded corpus (0: all); smaller is faster to tokenize")
    p.add_argument("--metrics-every", type=int, default=None,
                   help="logging interval for the overhead figure (default: config.yaml train.metrics_every)")
    p.add_argument("--rounds", type=int, default=10, help="round-robin rounds (median over rounds)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps per variant first (SPAM: past its grace period)")
    p.add_argument("--data-dir", default=None, help="work folder for corpus/shards/run folders (default: a temp dir)")
    p.add_argument("--out", default=None, help="folder for bench_variants.csv and bench_variants.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    experiment = load_experiment(args.config)
    variants = parse_variants(args.variants)
    base_train = experiment.get("train", {})
    tok_cfg = experiment.get("tokenizer", {})
    vocab = args.vocab or (str(tok_cfg.get("vocab_size", 2048)) if tok_cfg.get("kind", "bpe") == "bpe" else "gpt2")
    model_over = {k: v for k, v in {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head,
                                    "block_size": args.block_size}.items() if v is not None}
    metrics_every = args.metrics_every or int(base_train.get("metrics_every", 25))
    overrides = {
        "model": model_over,
        "train": {"dtype": args.dtype,
                  "steps": 10**7, "metrics_every": metrics_every,
                  **({"batch_size": args.batch_size} if args.batch_size else {})},
    }
    if args.compile:
        # one compiled GPT per variant: lift dynamo's per-code-object recompile limit (8)
        raise_recompile_limit(8 * len(variants) + 8)

    tmp = None
    if args.data_dir:
        workdir = Path(args.data_dir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_variants_")
        workdir = Path(tmp.name)
    try:
        t0 = time.perf_counter()
        shard_dir, meta = prepare_shards(workdir, vocab, args.max_chars, args.random_tokens)
        t_data = time.perf_counter() - t0
        kind = meta["tokenizer"]["kind"]
        runtime = RuntimeConfig(device=args.device, compile=bool(args.compile))
        result = _run(args, experiment, variants, overrides, runtime, shard_dir, kind, metrics_every, workdir, t_data)
        result["data_seconds"] = t_data
        result["vocab"] = meta["tokenizer"]["vocab_size"]
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(result["markdown"], flush=True)
    write_outputs(args.out, "bench_variants", result["rows"], result["markdown"])
    return result


def _run(args, experiment, variants, overrides, runtime, shard_dir, kind, metrics_every, workdir, t_data) -> dict:
    trainers: dict[str, Trainer] = {}
    for name in variants:
        cfg = build_run_config(experiment, name, overrides, shard_dir, kind)
        trainers[name] = Trainer(cfg, workdir / "runs" / name.replace("+", "_"), runtime)
    first = trainers[variants[0]]
    device, cfg0 = first.device, first.cfg
    ref = "baseline" if "baseline" in trainers else variants[0]

    # Warm-up: plain steps (compilation happens here), then one logging step per variant.
    t0 = time.perf_counter()
    for tr in trainers.values():
        for _ in range(warmup_steps_for(tr.cfg, args.warmup)):
            tr.train_step(False)
        _logging_step(tr)
        sync(device)
    t_warm = time.perf_counter() - t0

    plain = {name: [] for name in variants}
    logging = {name: [] for name in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        gc.collect()
        for name in order:
            tr = trainers[name]
            sync(device)
            t = time.perf_counter()
            for _ in range(args.steps):
                tr.train_step(False)
            sync(device)
            plain[name].append((time.perf_counter() - t) / args.steps)
            t = time.perf_counter()
            _logging_step(tr)  # ends with the host transfer, which waits for the device
            logging[name].append(time.perf_counter() - t)

    rows, table = [], []
    for name in variants:
        ms = statistics.median(plain[name]) * 1e3
        ratios = [a / b for a, b in zip(plain[name], plain[ref])]
        rel = (statistics.median(ratios) - 1) * 100
        q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
        iqr = (q[2] - q[0]) * 100
        log_ms = statistics.median(logging[name]) * 1e3
        overhead = (log_ms - ms) / (metrics_every * ms) * 100
        model = trainers[name].model
        rows.append({"variant": name, "params": model.num_params(), "ms_per_step": round(ms, 4),
                     "rel_to_baseline_pct": round(rel, 3), "rel_iqr_pp": round(iqr, 3),
                     "logging_step_ms": round(log_ms, 4), "logging_overhead_pct": round(overhead, 3),
                     "rounds": args.rounds, "steps_per_round": args.steps})
        table.append([name, f"{model.num_params():,}", f"{ms:.2f}", "—" if name == ref else f"{rel:+.1f} %",
                      f"{iqr:.1f}", f"{log_ms:.2f}", f"{overhead:.2f} %"])

    m, t = cfg0.model, cfg0.train
    base = next(r for r in rows if r["variant"] == ref)
    header = (f"# Variant step cost ({environment_line(device)})\n\n"
              f"Shapes: n_layer {m.n_layer}, n_embd {m.n_embd}, n_head {m.n_head}, block_size {m.block_size}, "
              f"batch {t.batch_size} x grad_accum {t.grad_accum}, vocab {m.vocab_size} "
              f"(padded {padded_vocab(m.vocab_size)}), "
              f"dtype {t.dtype}, compile {first.compiled}. {args.rounds} interleaved rounds x {args.steps} timed steps "
              f"per variant; data prep {t_data:.1f} s, warm-up {t_warm:.1f} s. "
              f"'step time vs {ref}': median of per-round "
              f"paired ratios minus 1 (positive: slower); "
              f"IQR of those ratios in percentage points (noise guide).\n")
    headers = ["variant", "params", "ms/step", f"step time vs {ref}", "IQR (pp)", "logging step (ms)",
               f"logging overhead @{metrics_every}"]
    overhead_line = (f"Metric logging overhead ({ref}): train_step(True) + stability_metrics() every "
                     f"{metrics_every} steps takes {base['logging_step_ms']:.2f} ms vs {base['ms_per_step']:.2f} ms "
                     f"for a plain step, i.e. {base['logging_overhead_pct']:.2f} % of step time amortized.")
    markdown = header + "\n" + markdown_table(headers, table) + "\n\n" + overhead_line
    return {"rows": rows, "markdown": markdown, "plain_s": plain, "logging_s": logging,
            "warmup_seconds": t_warm}


def _logging_step(tr: Trainer) -> dict[str, float]:
    """What the training loop adds at a metrics step: measured step, metrics, host transfer."""
    return to_floats({**tr.train_step(True), **tr.stability_metrics()})


if __name__ == "__main__":
    main()
