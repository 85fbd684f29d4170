"""Smoke tests of benchmarks/bench_variants.py and benchmarks/bench_throughput.py on a tiny CPU
config: every variant gets a row with positive numbers. No timing assertions."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:  # the scripts import each other by name, as when run from there
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # bench_throughput imports bench_variants by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_variants():
    return _load("bench_variants")


@pytest.fixture(scope="module")
def bench_throughput(bench_variants):
    return _load("bench_throughput")


def _table_rows(markdown: str) -> dict[str, list[str]]:
    """Data rows of the markdown table, keyed by their first cell."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| variant"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


TINY = ["--device", "cpu", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16",
        "--threads", "1"]


def test_bench_variants_tiny(bench_variants, tmp_path):
    out = tmp_path / "out"
    result = bench_variants.main(TINY + ["--batch-size", "2", "--vocab", "300", "--max-chars", "2000",
                                         "--rounds", "2", "--steps", "1", "--warmup", "1",
                                         "--data-dir", str(tmp_path / "work"), "--out", str(out)])
    names = bench_variants.VARIANTS
    assert [r["variant"] for r in result["rows"]] == names
    for r in result["rows"]:
        assert r["params"] > 0 and r["ms_per_step"] > 0 and r["logging_step_ms"] > 0, r
    assert next(r for r in result["rows"] if r["variant"] == "baseline")["rel_to_baseline_pct"] == 0
    table = _table_rows(result["markdown"])
    assert set(table) == set(names)
    for name in names:
        assert float(table[name][2]) > 0  # ms/step
    assert "Metric logging overhead (baseline)" in result["markdown"]
    with open(out / "bench_variants.csv") as f:
        assert [row["variant"] for row in csv.DictReader(f)] == names
    assert (out / "bench_variants.md").read_text().strip() == result["markdown"].strip()


def test_bench_variants_random_tokens_and_composition(bench_variants, tmp_path):
    result = bench_variants.main(TINY + ["--batch-size", "2", "--vocab", "100", "--random-tokens",
                                         "--max-chars", "2000", "--variants", "baseline,oec_center+zloss",
                                         "--rounds", "1", "--steps", "1", "--warmup", "0"])
    assert result["vocab"] == 100
    assert [r["variant"] for r in result["rows"]] == ["baseline", "oec_center+zloss"]
    assert all(r["ms_per_step"] > 0 for r in result["rows"])


def test_bench_throughput_tiny(bench_throughput, bench_variants, tmp_path):
    out = tmp_path / "out"
    result = bench_throughput.main(TINY + ["--vocab", "300", "--batch-size", "4", "--micro-batch", "2",
                                           "--warmup", "1", "--steps", "1", "--peak-tflops", "1",
                                           "--out", str(out)])
    names = bench_variants.VARIANTS  # the default variant list both scripts use
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == names
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["ms_per_step"] > 0 and r["mfu_pct"] > 0 and r["flops_per_token"] > 0
        # nanoGPT's estimate: 6 N + 12 L H Q T, N without position embeddings
        L, H, Q, T = 1, 2, 8, 16
        assert r["flops_per_token"] == 6 * r["params_non_embedding"] + 12 * L * H * Q * T
        assert r["params_non_embedding"] == r["params"] - 16 * 16  # wpe: block_size x n_embd
    assert rows["mlra"]["params"] < rows["baseline"]["params"]  # factorized attention counted as such
    table = _table_rows(result["markdown"])
    assert set(table) == set(names)
    for name in names:
        assert float(table[name][4]) > 0  # ms/step
        assert float(table[name][5].replace(",", "")) > 0  # tokens/s
    with open(out / "throughput.csv") as f:
        assert [row["variant"] for row in csv.DictReader(f)] == names
    assert (out / "throughput.md").exists()


def test_bench_throughput_profile_sorts_the_time_by_kind(bench_throughput, tmp_path):
    out = tmp_path / "out"
    bench_throughput.main(TINY + ["--vocab", "300", "--batch-size", "4", "--micro-batch", "2", "--warmup", "1",
                                  "--steps", "1", "--variants", "baseline", "--profile-steps", "2", "--out", str(out)])
    text = (out / "profile_baseline.md").read_text()
    kinds = {}
    for line in text.split("\n\n")[2].splitlines()[2:]:  # the by-kind table's rows
        kind, ms, share = (c.strip() for c in line.strip("|").split("|"))
        kinds[kind] = (float(ms), float(share.rstrip(" %")))
    assert {"matmul", "attention", "optimizer"} <= set(kinds)
    assert sum(share for _, share in kinds.values()) == pytest.approx(100, abs=0.5)
    assert "| matmul | `aten::mm` | " in text  # its calls per step follow: 2 micro-batches' worth, not 1/steps
    calls = float(text.split("| matmul | `aten::mm` | ")[1].split("|")[0])
    assert calls >= 2 * 3  # at least q/k/v-or-fused, proj and MLP matmuls, forward, for each micro-batch


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel",
     "matmul"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopA_TNT", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0", "attention"),
    ("triton_per_fused__to_copy_add_native_layer_norm_0", "Triton-fused elementwise and reductions"),
    ("triton_tem_fused_mm_0", "matmul"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("Memcpy DtoD (Device -> Device)", "memory copy / set"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "memory copy / set"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::NormTwoOps<float>>>", "other"),
])
def test_kernel_kinds_of_real_kernel_names(bench_throughput, name, kind):
    assert bench_throughput.kernel_kind(name) == kind


def test_busy_time_is_the_union_of_kernel_intervals(bench_throughput):
    assert bench_throughput.busy_time([]) == 0
    assert bench_throughput.busy_time([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == pytest.approx(4)
    assert bench_throughput.busy_time([(4, 9), (0, 1)]) == pytest.approx(6)


@pytest.mark.slow
def test_bench_throughput_under_torchrun_reports_the_global_rate(tmp_path):
    """Two gloo processes (what `torchrun --nproc_per_node 2` does on two GPUs): rank 0 writes one
    table whose header names the process count, with the global batch and a per-device MFU, and
    the profile (both ranks run its steps: one rank alone would wait for the other's all-reduce)."""
    import os
    import subprocess

    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(BENCH.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(BENCH / "bench_throughput.py"), *TINY, "--no-compile", "--variants", "baseline", "--vocab", "300",
           "--batch-size", "4", "--micro-batch", "2", "--warmup", "1", "--steps", "2", "--profile-steps", "1",
           "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| matmul |" in (out / "profile_baseline.md").read_text()
    markdown = (out / "throughput.md").read_text()
    assert "2 processes (DDP" in markdown and "/ processes" in markdown
    with open(out / "throughput.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"] == "ok" and row["processes"] == "2" and row["batch_size"] == "4"
    assert float(row["tokens_per_s"]) == pytest.approx(4 * 16 / (float(row["ms_per_step"]) / 1e3), rel=1e-6)
    # MFU per device: the global FLOP rate divided by 2 processes (and the 989 TFLOP/s peak)
    assert float(row["mfu_pct"]) == pytest.approx(
        100 * float(row["flops_per_token"]) * float(row["tokens_per_s"]) / (2 * 989e12), rel=1e-6)


def test_bench_grid_retries_a_run_that_exits_75_and_keeps_its_log(monkeypatch, tmp_path):
    """A run out of GPU memory (or preempted) exits 75: bench_grid tries it again (appending to its
    log) up to --retries times; a run still exiting 75 after that is reported as failed."""
    bench_grid = _load("bench_grid")

    def run_grid(exit_codes: list[int], retries: int):
        calls, codes = [], iter(exit_codes)

        def fake_cli(args, log, append=False):
            if args[0] != "train":
                return 0
            calls.append(append)
            return next(codes, 0)

        monkeypatch.setattr(bench_grid, "run_cli", fake_cli)
        monkeypatch.setattr(bench_grid, "RETRY_PAUSE_S", 0.0)
        monkeypatch.setattr(bench_grid, "prepare_data", lambda cfg, res: None)
        monkeypatch.setattr(bench_grid, "REPO", tmp_path)  # no summary.json there: every run is to train
        monkeypatch.setattr(bench_grid, "report",
                            lambda args, cfg, res, trained, wall, t_data, failed, skipped: (trained, failed))
        trained, failed = bench_grid.main(
            ["--config", str(BENCH.parent / "config.yaml"), "--studies", "lr", "--variants", "baseline",
             "--seeds", "0", "--jobs", "1", "--no-report", "--retries", str(retries)])
        return calls, trained, failed

    calls, trained, failed = run_grid([75, 75, 0], retries=2)
    n = len(trained)
    assert n >= 2 and not failed
    assert calls == [False, True, True] + [False] * (n - 1)  # the first run took three attempts

    calls, trained, failed = run_grid([75, 75, 0], retries=1)
    assert len(failed) == 1 and len(trained) == n - 1  # the first run gave up after one retry
    assert calls[:2] == [False, True]


def test_bench_grid_tables_after_a_slice_cover_every_finished_run_of_the_preset(monkeypatch, tmp_path):
    """A slice that completes a grid (here: one variant) redraws the tables from every run of the
    preset with a summary, the runs finished earlier included, and from no run outside the preset."""
    bench_grid = _load("bench_grid")
    from stabilab.experiment import load_experiment, runs

    config = BENCH.parent / "config.yaml"
    cfg = load_experiment(str(config))
    res = tmp_path / bench_grid.RESULTS.format(name=cfg["name"])
    earlier = next(r for r in runs(cfg) if r.study == "lr" and r.variant == "zloss")
    (res / earlier.path).mkdir(parents=True)
    (res / earlier.path / "summary.json").write_text("{}")
    stray = res / "runs" / "lr" / "not_in_preset" / "L2_lr0.1_s0"
    stray.mkdir(parents=True)
    (stray / "summary.json").write_text("{}")
    tables = []

    def fake_cli(args, log, append=False):
        if args[0] == "train":
            out = Path(args[args.index("--out") + 1])
            out.mkdir(parents=True, exist_ok=True)
            (out / "summary.json").write_text("{}")
        elif args[0] == "tables":
            tables.append([a for a in args if a.endswith("summary.json")])
        return 0

    monkeypatch.setattr(bench_grid, "run_cli", fake_cli)
    monkeypatch.setattr(bench_grid, "prepare_data", lambda cfg, res: None)
    monkeypatch.setattr(bench_grid, "REPO", tmp_path)
    monkeypatch.setattr(bench_grid, "report", lambda args, cfg, res, trained, wall, t_data, failed, skipped:
                        (trained, failed))
    trained, failed = bench_grid.main(["--config", str(config), "--studies", "lr", "--variants", "baseline",
                                       "--seeds", "0", "--jobs", "1", "--no-compile-first"])
    assert trained and not failed
    assert len(tables) == 1
    listed = {Path(p).parent for p in tables[0]}
    assert res / earlier.path in listed  # finished before this slice, outside it
    assert {res / r.path for r in trained} <= listed
    assert stray not in listed
    assert len(listed) == len(trained) + 1


def test_bench_grid_compile_first_holds_a_graphs_later_runs_until_its_first_has_logged(monkeypatch, tmp_path):
    """--compile-first: of the runs that compile the same graphs (one variant, LRs differing),
    the first starts alone and the others once it has logged its first step; another variant's
    first run does not wait. A first run that exits without logging releases the others."""
    import threading
    import time as clock

    bench_grid = _load("bench_grid")
    monkeypatch.setattr(bench_grid.CompileFirst, "POLL_S", 0.005)
    events, guard = [], threading.Lock()

    def note(what, out):
        with guard:
            events.append((clock.monotonic(), what, Path(out).parent.name, Path(out).name))

    def fake_cli(args, log, append=False):
        if args[0] != "train":
            return 0
        out = Path(args[args.index("--out") + 1])
        note("start", out)
        clock.sleep(0.15)  # compiling
        if Path(out).parent.name == "zloss" or "lr0.1_" not in out.name:  # baseline's first run logs nothing
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.jsonl").write_text('{"step": 1}\n')
            note("logged", out)
        clock.sleep(0.1)
        return 0 if (out / "metrics.jsonl").exists() else 1

    monkeypatch.setattr(bench_grid, "run_cli", fake_cli)
    monkeypatch.setattr(bench_grid, "prepare_data", lambda cfg, res: None)
    monkeypatch.setattr(bench_grid, "REPO", tmp_path)
    monkeypatch.setattr(bench_grid, "report", lambda args, cfg, res, trained, wall, t_data, failed, skipped:
                        (trained, failed))
    trained, failed = bench_grid.main(["--config", str(BENCH.parent / "config.yaml"), "--studies", "lr",
                                       "--variants", "baseline", "zloss", "--jobs", "4", "--no-report",
                                       "runtime.compile=true"])  # compile-first is the default when runs compile
    assert len(trained) == 5 and len(failed) == 1  # baseline's first run exited 1 without logging
    starts = {(v, r): t for t, what, v, r in events if what == "start"}
    logged = {(v, r): t for t, what, v, r in events if what == "logged"}
    first = {v: min((t, r) for (w, r), t in starts.items() if w == v) for v in ("baseline", "zloss")}
    assert first["baseline"][1].startswith("L") and "lr0.1_" in first["baseline"][1]  # the launch order's first
    assert first["zloss"][0] < first["baseline"][0] + 0.15  # two graph keys: zloss did not wait for baseline
    for (variant, run), t in starts.items():
        if run == first[variant][1]:
            continue
        if variant == "zloss":  # started only after its key's first run had logged
            assert t >= logged[("zloss", first["zloss"][1])]
        else:  # released when baseline's first run exited (it never logged)
            assert t >= first["baseline"][0] + 0.25


def test_compile_first_is_the_default_only_where_the_runs_compile():
    """On by default, off with --no-compile-first, and never where the runs do not compile (the CPU's
    `compile: auto`), where holding the followers back would only delay them."""
    bench_grid = _load("bench_grid")
    config = str(BENCH.parent / "config.yaml")
    assert bench_grid.parse_args(["--config", config]).compile_first
    assert not bench_grid.parse_args(["--config", config, "--no-compile-first"]).compile_first
    cfg = bench_grid.load_experiment(config, {})
    assert bench_grid.runs_compile(cfg) is bench_grid.torch.cuda.is_available()
    assert bench_grid.runs_compile(bench_grid.load_experiment(config, {"runtime": {"compile": True}}))
    assert not bench_grid.runs_compile(bench_grid.load_experiment(config, {"runtime": {"compile": False}}))


def test_compile_first_waits_for_a_resumed_pioneer_to_log_past_its_checkpoint(monkeypatch, tmp_path):
    """A pioneer resuming from step 8 first rewrites its log up to step 8 (the old log held steps up
    to 12); its followers start only once it has logged step 9, or when the grid stops. A stack
    and a single run of one graph key compile different graphs: different job keys."""
    import threading
    import time as clock
    from types import SimpleNamespace

    bench_grid = _load("bench_grid")
    monkeypatch.setattr(bench_grid.CompileFirst, "POLL_S", 0.005)
    monkeypatch.setattr(bench_grid, "CHILDREN", SimpleNamespace(stopping=False))
    lead, follower = SimpleNamespace(path="runs/a"), SimpleNamespace(path="runs/b")
    log = tmp_path / "runs/a/metrics.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text("".join(f'{{"step": {s}}}\n' for s in (1, 4, 8, 12)))  # the lost attempt's records
    os.utime(log, (clock.time() - 3600, clock.time() - 3600))  # written an hour before this attempt
    monkeypatch.setattr("stabilab.train.checkpoint.checkpoint_step", lambda folder: 8)
    grid = bench_grid.CompileFirst([[lead], [follower]], ["k", "k"], tmp_path)
    assert grid.before([lead]) is grid.exited["runs/a"]
    released = threading.Event()
    waiter = threading.Thread(target=lambda: (grid.before([follower]), released.set()))
    waiter.start()
    clock.sleep(0.05)
    assert not released.is_set()  # the old log, though longer, was written before the pioneer started
    log.write_text('{"step": 1}\n{"step": 8}\n')  # the resume's rewrite: not past step 8 yet
    clock.sleep(0.05)
    assert not released.is_set()
    with open(log, "a") as f:
        f.write('{"step": 9}\n')
    assert released.wait(2.0)
    waiter.join()

    grid = bench_grid.CompileFirst([[lead], [follower]], ["k", "k"], tmp_path)
    grid.before([lead])  # a pioneer that never logs; the grid is stopped
    monkeypatch.setattr(bench_grid, "CHILDREN", SimpleNamespace(stopping=True))
    assert grid.before([follower]) is None  # returns at once

    cfg = bench_grid.load_experiment(str(BENCH.parent / "config.yaml"), {})
    runs = [r for r in bench_grid.runs(cfg) if r.study == "lr" and r.variant == "baseline"]
    assert bench_grid.job_key(cfg, runs[:2]) != bench_grid.job_key(cfg, runs[2:])  # a stack of 2, a run alone
    assert bench_grid.job_key(cfg, runs[:1]) == bench_grid.job_key(cfg, runs[2:])  # LR apart, the same graphs


def test_bench_grid_stacks_runs_that_differ_only_in_lr_and_seed(monkeypatch, tmp_path):
    """--stacked N: the lr study's 3 LRs of one variant are one `train-stacked` job (at most N
    members), a method the stacked path refuses (mu-centering's post-step hook) trains alone."""
    bench_grid = _load("bench_grid")
    jobs = []

    def fake_cli(args, log, append=False):
        if args[0] in ("train", "train-stacked"):
            jobs.append(args[:args.index("--runtime")])
        return 0

    monkeypatch.setattr(bench_grid, "run_cli", fake_cli)
    monkeypatch.setattr(bench_grid, "prepare_data", lambda cfg, res: None)
    monkeypatch.setattr(bench_grid, "REPO", tmp_path)
    monkeypatch.setattr(bench_grid, "report", lambda args, cfg, res, trained, *rest: trained)
    trained = bench_grid.main(["--config", str(BENCH.parent / "config.yaml"), "--studies", "lr", "--variants",
                               "baseline", "zloss", "oec_center", "--jobs", "1", "--no-report", "--stacked", "2"])
    assert len(trained) == 9
    stacked = [j for j in jobs if j[0] == "train-stacked"]
    alone = [j for j in jobs if j[0] == "train"]
    members = [j[j.index("--runs") + 1:j.index("--outs")] for j in stacked]
    assert sorted(len(m) for m in members) == [2, 2]  # baseline and zloss: 3 LRs = a job of 2 + one alone
    assert len(alone) == 2 + 3  # each variant's third LR, and the 3 mu-centering runs
    assert all("oec_center" not in " ".join(m) for m in members)
    for m in members:  # the members of a job share their variant
        assert len({Path(f).name.split("_L")[0] for f in m}) == 1


def test_bench_grid_stacks_only_runs_that_resume_from_the_same_step(monkeypatch, tmp_path):
    """Two of three LRs have checkpoints of step 8 (a stopped group), the third none: the two are
    one job again, the third trains alone (a stack holds its members at one step)."""
    from stabilab.experiment import load_experiment, runs
    from stabilab.layout import RESULTS
    from stabilab.train.checkpoint import save_checked

    bench_grid = _load("bench_grid")
    config = BENCH.parent / "config.yaml"
    cfg = load_experiment(config)
    res = tmp_path / RESULTS.format(name=cfg["name"])
    lr_runs = [r for r in runs(cfg) if r.study == "lr" and r.variant == "baseline"]
    for run in lr_runs[:2]:
        (res / run.path).mkdir(parents=True)
        save_checked({"step": 8}, res / run.path / "ckpt.pt")
    jobs = []

    def fake_cli(args, log, append=False):
        if args[0] in ("train", "train-stacked"):
            jobs.append([Path(o).name for o in args[args.index("--outs" if args[0] == "train-stacked" else "--out") + 1:
                                                     args.index("--runtime")]])
        return 0

    monkeypatch.setattr(bench_grid, "run_cli", fake_cli)
    monkeypatch.setattr(bench_grid, "prepare_data", lambda cfg, res: None)
    monkeypatch.setattr(bench_grid, "REPO", tmp_path)
    monkeypatch.setattr(bench_grid, "report", lambda args, cfg, res, trained, *rest: trained)
    bench_grid.main(["--config", str(config), "--studies", "lr", "--variants", "baseline", "--jobs", "1",
                     "--no-report", "--stacked", "3"])
    assert sorted(sorted(j) for j in jobs) == sorted([sorted(Path(r.path).name for r in lr_runs[:2]),
                                                      [Path(lr_runs[2].path).name]])


def test_a_stacked_job_that_stops_retries_only_its_unfinished_members(monkeypatch, tmp_path):
    """A stacked job exits 75 after one member finished: the retry trains the other alone, and both
    are reported as trained (the finished member is neither retrained nor counted as failed)."""
    bench_grid = _load("bench_grid")
    jobs = []

    def fake_cli(args, log, append=False):
        if args[0] not in ("train", "train-stacked"):
            return 0
        jobs.append(args[0])
        if args[0] == "train-stacked":  # the first member finishes, then the GPU runs out of memory
            first = Path(args[args.index("--outs") + 1])
            first.mkdir(parents=True, exist_ok=True)
            (first / "summary.json").write_text("{}")
            return 75
        return 0

    monkeypatch.setattr(bench_grid, "run_cli", fake_cli)
    monkeypatch.setattr(bench_grid, "RETRY_PAUSE_S", 0.0)
    monkeypatch.setattr(bench_grid, "prepare_data", lambda cfg, res: None)
    monkeypatch.setattr(bench_grid, "REPO", tmp_path)
    monkeypatch.setattr(bench_grid, "report", lambda args, cfg, res, trained, wall, t_data, failed, skipped:
                        (trained, failed))
    trained, failed = bench_grid.main(["--config", str(BENCH.parent / "config.yaml"), "--studies", "lr",
                                       "--variants", "baseline", "--lrs", "0.01", "0.1", "--jobs", "1",
                                       "--no-report", "--stacked", "2"])
    assert jobs == ["train-stacked", "train"] and len(trained) == 2 and not failed


def _fake_mps_control(folder: Path, fail: bool = False) -> Path:
    """An nvidia-cuda-mps-control stand-in on PATH: logs its arguments, stdin and pipe directory."""
    exe = folder / "nvidia-cuda-mps-control"
    exe.write_text("#!/bin/sh\n"
                   f'echo "args=$* pipe=$CUDA_MPS_PIPE_DIRECTORY" >> {folder}/calls.log\n'
                   f'[ "$1" = "-d" ] || cat >> {folder}/calls.log\n'
                   f"exit {1 if fail else 0}\n")
    exe.chmod(0o755)
    return folder / "calls.log"


def test_bench_grid_runs_the_grid_under_mps_and_stops_the_daemon(monkeypatch, tmp_path):
    """--mps: the control daemon is started before the first run, every run is launched with its
    pipe directory in the environment, the daemon is told to quit at the end, and the environment
    is restored; without the program, or when it fails to start, one line says so."""
    bench_grid = _load("bench_grid")
    (tmp_path / "bin").mkdir()
    calls = _fake_mps_control(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    pipes = []

    def fake_cli(args, log, append=False):
        if args[0] == "train":
            pipes.append(os.environ.get("CUDA_MPS_PIPE_DIRECTORY"))
        return 0

    monkeypatch.setattr(bench_grid, "run_cli", fake_cli)
    monkeypatch.setattr(bench_grid, "prepare_data", lambda cfg, res: None)
    monkeypatch.setattr(bench_grid, "REPO", tmp_path)
    monkeypatch.setattr(bench_grid, "report", lambda args, cfg, res, trained, *rest: trained)
    argv = ["--config", str(BENCH.parent / "config.yaml"), "--studies", "lr", "--variants", "baseline",
            "--jobs", "2", "--no-report", "--mps"]
    assert len(bench_grid.main(argv)) == 3
    log = calls.read_text().splitlines()
    assert len(set(pipes)) == 1 and pipes[0] and log == [f"args=-d pipe={pipes[0]}", f"args= pipe={pipes[0]}", "quit"]
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
    _fake_mps_control(tmp_path / "bin", fail=True)
    with pytest.raises(SystemExit, match="--mps: 'nvidia-cuda-mps-control -d' failed"):
        bench_grid.main(argv)
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SystemExit, match="--mps: nvidia-cuda-mps-control is not on PATH"):
        bench_grid.main(argv)
    # a daemon already serving this environment (another grid's) is joined, neither started nor quit
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "shared-pipe"))
    pipes.clear()
    assert len(bench_grid.main(argv)) == 3
    assert pipes == [str(tmp_path / "shared-pipe")] * 3
    assert os.environ["CUDA_MPS_PIPE_DIRECTORY"] == str(tmp_path / "shared-pipe")


def test_a_sigterm_to_bench_grid_stops_its_runs_and_launches_no_more(monkeypatch, tmp_path):
    """bench_grid passes a SIGTERM on to the runs in flight (which exit 75, as a preempted run does)
    and starts no other: none is left training as an orphan, and the rest are reported untrained."""
    bench_grid = _load("bench_grid")
    child = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(75)); "
             "print('started', flush=True); time.sleep(60)")
    monkeypatch.setattr(bench_grid, "STABILAB", [sys.executable, "-c", child])
    monkeypatch.setattr(bench_grid, "prepare_data", lambda cfg, res: None)
    monkeypatch.setattr(bench_grid, "REPO", tmp_path)
    monkeypatch.setattr(bench_grid, "report", lambda args, cfg, res, trained, wall, t_data, failed, skipped:
                        (trained, failed, skipped))
    before = signal.getsignal(signal.SIGTERM)
    done = threading.Event()

    def sigterm_once_both_run():  # into bench_grid's handler only: never after main() returned
        while not done.wait(0.05):
            logs = list((tmp_path / "results").rglob("*.log"))
            if len(logs) == 2 and all(log.read_text() == "started\n" for log in logs):
                if signal.getsignal(signal.SIGTERM) == bench_grid.CHILDREN.stop:
                    os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=sigterm_once_both_run, daemon=True).start()
    t0 = time.time()
    try:
        trained, failed, skipped = bench_grid.main(["--config", str(BENCH.parent / "config.yaml"), "--studies",
                                                    "lr", "--variants", "baseline", "--jobs", "2", "--no-report"])
    finally:
        done.set()
    assert time.time() - t0 < 30 and not trained and not failed and len(skipped) == 3
    logs = sorted((tmp_path / "results").rglob("*.log"))
    assert len(logs) == 2 and all(log.read_text() == "started\n" for log in logs)  # the third never started
    assert signal.getsignal(signal.SIGTERM) == before


def test_compile_mode_check_reports_each_quantitys_largest_difference():
    check = _load("check_compile_mode")
    # as metrics.jsonl holds them: non-finite values are null; run a stopped (diverged) at step 50
    a = {25: {"step": 25, "train_loss": 5.0, "val_loss": None, "tokens_per_s": 1.0},
         50: {"step": 50, "train_loss": 4.0, "grad_norm": None, "tokens_per_s": 2.0}}
    b = {25: {"step": 25, "train_loss": 5.5, "val_loss": None, "tokens_per_s": 9.0},
         50: {"step": 50, "train_loss": 4.0, "grad_norm": 3.0, "tokens_per_s": 9.0}, 75: {"train_loss": 1.0}}
    rows = {r["quantity"]: r for r in check.differences(a, b)}
    assert set(rows) == {"train_loss", "val_loss", "grad_norm", "steps logged"}  # speed is not compared
    assert rows["train_loss"]["max_rel_diff"] == pytest.approx(0.5 / 6.5) and rows["train_loss"]["at_step"] == 25
    assert rows["val_loss"]["max_rel_diff"] == 0.0 and rows["grad_norm"]["max_rel_diff"] == float("inf")
    assert rows["steps logged"] == {"quantity": "steps logged", "max_rel_diff": float("inf"), "at_step": 75}


def test_compile_mode_check_trains_the_run_and_its_floor_through_the_cli(monkeypatch, tmp_path, tiny_data):
    """End to end on the CPU, compile off: the three trainings (default, the mode, the default's
    repeat) are the same computation, so every logged quantity agrees exactly in both columns;
    compare.md and every run folder are written."""
    check = _load("check_compile_mode")
    monkeypatch.setattr(check.bench_grid, "prepare_data", lambda cfg, res: None)
    monkeypatch.setattr(check, "shards_dir", lambda cfg: tiny_data["shards"])
    rows = check.main(["--config", str(BENCH.parent / "config.yaml"), "--study", "lr", "--variant", "baseline",
                       "--lr", "0.01", "--out", str(tmp_path / "cmp"), "runtime.compile=false", "train.steps=12",
                       "train.log_every=4", "train.metrics_every=4", "train.eval_every=6", "model.n_embd=32",
                       "model.n_head=2", "model.block_size=32", "train.batch_size=4", "train.grad_accum=1",
                       "tokenizer.vocab_size=300"])
    assert {"train_loss", "val_loss", "grad_norm"} <= {r["quantity"] for r in rows}
    assert all(r["max_rel_diff"] == 0.0 for r in rows)
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert md.count("| default |") == 1 and md.count("| default-repeat |") == 1
    assert "| train_loss | 0 | 1 | 0 | 1 |" in md  # the mode's difference beside the floor's (first step)
    assert all((tmp_path / "cmp" / name / "summary.json").exists() for name in ("reduce-overhead", "default-repeat"))


def test_bench_grid_samples_gpu_utilization_while_it_trains(monkeypatch, tmp_path):
    """With nvidia-smi on PATH, its samples land in gpu_util.csv during the block and stop after it;
    grid.md's line counts them; without nvidia-smi nothing is written."""
    bench_grid = _load("bench_grid")
    (tmp_path / "bin").mkdir()
    smi = tmp_path / "bin" / "nvidia-smi"  # alternately busy and half idle, as fast as the test needs
    smi.write_text("#!/bin/sh\nwhile true; do echo '2026/12/01 10:00:00.000, 0, 100, 2048'; "
                   "echo '2026/12/01 10:00:00.100, 0, 50, 4096'; sleep 0.1; done\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    log = tmp_path / "grid" / "gpu_util.csv"
    with bench_grid.gpu_sampler(log):
        time.sleep(1.0)
    n = len(log.read_text().splitlines())
    time.sleep(0.5)
    assert n >= 3 and len(log.read_text().splitlines()) == n  # stopped with the block
    line = bench_grid.utilization_line(log)
    busy, total = (int(w) for w in line.split(">= 99 % in ")[1].split(" samples")[0].split(" of "))
    assert total == n - 1 and abs(busy - total / 2) <= 1 and "up to 4.0 GiB" in line
    monkeypatch.setenv("PATH", "/nonexistent")
    with bench_grid.gpu_sampler(tmp_path / "none.csv"):
        pass
    assert not (tmp_path / "none.csv").exists() and bench_grid.utilization_line(tmp_path / "none.csv") is None


def test_bench_stacked_tiny(bench_throughput, tmp_path):
    """Both preset shapes (tiny), the single run and N = 1, 2 stacked members: every row ok with
    positive numbers, the stacked rows' tokens counting all members, the table written to --out."""
    bench_stacked = _load("bench_stacked")
    out = tmp_path / "out"
    result = bench_stacked.main(["--tiny", "--device", "cpu", "--warmup", "1", "--steps", "2", "--out", str(out)])
    rows = result["rows"]
    assert [(r["shape"], r["mode"], r["members"]) for r in rows] == [
        (shape, mode, n) for shape in ("oec", "two_instabilities")
        for mode, n in (("single train_step", 1), ("stacked", 1), ("stacked", 2))]
    for r in rows:
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["mfu_pct"] > 0 and r["flops_per_token"] > 0, r
    for shape in ("oec", "two_instabilities"):  # one member's FLOPs per token, the single run's
        assert len({r["flops_per_token"] for r in rows if r["shape"] == shape}) == 1
    two = next(r for r in rows if r["members"] == 2 and r["shape"] == "oec")
    assert two["tokens_per_s"] == pytest.approx(2 * 2 * 16 / (two["ms_per_step"] / 1e3), rel=1e-9)
    table = (out / "stacked.md").read_text()
    assert table.strip() == result["markdown"].strip() and table.count("| stacked |") == 4
    with open(out / "stacked.csv") as f:
        assert len(list(csv.DictReader(f))) == 6


# ----------------------------------------------------------------------------- paper_scale_smoke.py

SHRUNK = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.mlp_hidden=64", "model.block_size=32"]


def test_paper_scale_smoke_trains_each_study_at_its_global_batch_and_writes_calibration_rows(
        bench_variants, tmp_path, monkeypatch):
    """The GPU smoke test's code path on the CPU with a shrunken model: every chosen study trains on
    one process with its preset's global batch (the 2-GPU study's micro-batches in turn), and its
    tokens/s land in calibration rows whose source table holds them (as the calibration test reads
    calibration.csv)."""
    smoke = _load("paper_scale_smoke")
    monkeypatch.chdir(tmp_path)
    out = Path("smoke")  # relative, as benchmarks/results/... would be from the repository root
    rows = smoke.main(["--config", str(BENCH.parent / "configs" / "paper_scale" / "spam.yaml"), "--device", "cpu",
                       "--steps", "2", "--warmup", "1", "--study", "llama60m", "llama130m", "--micro-batch", "2",
                       "--out", str(out), *SHRUNK, "train.batch_size=4", "train.grad_accum=2"])
    assert [r["study"] for r in rows] == ["llama60m", "llama130m"] and all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert (r["micro_batch"], r["grad_accum"], r["tokens_per_step"]) == (2, 4, 8 * 32)  # global 8 sequences kept
        assert r["tokens_per_s"] > 0 and math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"])
        assert r["run"] == {"llama60m": "runs/llama60m/adam/L8_lr0.001_s0",
                            "llama130m": "runs/llama130m/adam/L12_lr0.0008_s0"}[r["study"]]
    assert [r["processes"] for r in rows] == [1, 2]  # the cluster's; the smoke test ran one process
    with open(out / "calibration_rows.csv", newline="") as f:
        calibration = list(csv.DictReader(f))
    assert [(c["device"], c["preset"], c["runs"], c["model_pflop"]) for c in calibration] == [
        ("cpu", "spam_paper_scale/llama60m", "1", ""), ("cpu", "spam_paper_scale/llama130m", "1", "")]
    record = (tmp_path / calibration[0]["source"]).read_text().splitlines()
    for c in calibration:
        cells = f"| {float(c['gflop_per_token']):.4g} |", f"| {int(c['tokens_per_s']):,} |"
        assert any(all(cell in line for cell in cells) for line in record), c


def test_paper_scale_smoke_halves_the_micro_batch_until_it_fits(bench_variants, monkeypatch, tmp_path):
    smoke = _load("paper_scale_smoke")
    assert [smoke.smaller_micro_batch(512, m) for m in (128, 64, 3, 1)] == [64, 32, 1, None]
    assert smoke.smaller_micro_batch(480, 12) == 6 and smoke.smaller_micro_batch(64, 16) == 8
    real = smoke.measure
    seen = []

    def out_of_memory_above_1(cfg, *args):
        seen.append(cfg.train.batch_size)
        if cfg.train.batch_size > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(cfg, *args)

    import torch

    monkeypatch.setattr(smoke, "measure", out_of_memory_above_1)
    (row,) = smoke.main(["--config", str(BENCH.parent / "configs" / "paper_scale" / "oec.yaml"), "--device", "cpu",
                         "--steps", "1", "--warmup", "1", "--study", "m16", *SHRUNK, "train.batch_size=4",
                         "train.grad_accum=1"])
    assert seen == [4, 2, 1] and (row["status"], row["micro_batch"], row["grad_accum"]) == ("ok", 1, 4)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert smoke.device_kind(torch.device("cuda")) == "h100" and smoke.device_kind(torch.device("cpu")) == "cpu"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert smoke.device_kind(torch.device("cuda")) == "a100-sxm4-80gb"


def test_bench_cpu_job_compare_ignores_machine_measurements_only(tmp_path):
    """`bench_cpu_job.py compare`, the check that a speed-up kept every number: wall times and
    tokens/s may differ (columns, or a summary table's rows), any other cell may not."""
    bench = _load("bench_cpu_job")
    for name, wall, loss, row_wall in (("a", "10.5", "3.25", "30.1"), ("b", "9.0", "3.25", "24.7"),
                                       ("c", "9.0", "3.2500001", "24.7")):
        tables = tmp_path / name / "tables"
        tables.mkdir(parents=True)
        (tables / "runs.csv").write_text("study,final_val_loss,wall_time_s,git_commit\n"
                                         f"depth,{loss},{wall},abc{name}\n")
        (tables / "summary_depth.csv").write_text(f"study,metric,mean\ndepth,wall_time_s,{row_wall}\n"
                                                  f"depth,final_val_ppl,{loss}\n")
    compared, diffs, skipped = bench.compare_tables(tmp_path / "a", tmp_path / "b")
    assert len(compared) == 2 and diffs == [] and {"wall_time_s", "git_commit"} <= skipped
    _, diffs, _ = bench.compare_tables(tmp_path / "a", tmp_path / "c")
    assert diffs == ["tables/runs.csv line 2: final_val_loss", "tables/summary_depth.csv line 3: mean"]


def test_bench_grid_commit_trains_again_every_run_of_another_commit_and_keeps_its_folder(monkeypatch, tmp_path):
    """--commit SHA: a finished run trained by SHA (full or abbreviated) is skipped; one trained by another
    commit, or with no commit on record, is moved aside to <folder>.by-<commit> (never deleted) and trained
    again, so that a grid split over leases ends with every run from one commit."""
    import json

    from stabilab.experiment import load_experiment

    bench_grid = _load("bench_grid")
    cfg = load_experiment(str(BENCH.parent / "config.yaml"))
    res = tmp_path / "results" / cfg["name"]
    grid = [r for r in bench_grid.runs(cfg) if r.study == "lr" and r.variant == "baseline" and r.seed == 0][:4]
    assert len(grid) >= 3
    commits = ["abc1234def", "0123456789ab", None]
    for run, commit in zip(grid, commits):
        folder = res / run.path
        folder.mkdir(parents=True)
        provenance = {"git_commit": commit} if commit else {}
        (folder / "summary.json").write_text(json.dumps({"provenance": provenance}))
        (folder / "metrics.jsonl").write_text("{}\n")
    trained = []

    def fake_cli(args, log, append=False):
        if args[0] == "train":
            out = Path(args[args.index("--out") + 1])
            trained.append(str(out.relative_to(res)))
            out.mkdir(parents=True, exist_ok=True)
            (out / "summary.json").write_text(json.dumps({"provenance": {"git_commit": "abc1234def"}}))
        return 0

    monkeypatch.setattr(bench_grid, "run_cli", fake_cli)
    monkeypatch.setattr(bench_grid, "prepare_data", lambda cfg, res: None)
    monkeypatch.setattr(bench_grid, "REPO", tmp_path)
    monkeypatch.setattr(bench_grid, "report", lambda args, cfg, res, trained, wall, t_data, failed, skipped: trained)
    lrs = [str(r.lr) for r in grid]
    bench_grid.main(["--config", str(BENCH.parent / "config.yaml"), "--studies", "lr", "--variants", "baseline",
                     "--seeds", "0", "--lrs", *lrs, "--jobs", "1", "--no-report", "--commit", "abc1234"])
    assert sorted(trained) == sorted(r.path for r in grid[1:])  # the run of abc1234 was kept
    other, unknown = res / grid[1].path, res / grid[2].path
    assert (other.with_name(other.name + ".by-0123456") / "metrics.jsonl").exists()
    assert (unknown.with_name(unknown.name + ".by-unknown") / "summary.json").exists()
    # the same again moves nothing: every run is now of abc1234
    trained.clear()
    bench_grid.main(["--config", str(BENCH.parent / "config.yaml"), "--studies", "lr", "--variants", "baseline",
                     "--seeds", "0", "--lrs", *lrs, "--jobs", "1", "--no-report", "--commit", "abc1234def"])
    assert trained == []


@pytest.mark.skipif(shutil.which("xz") is None or shutil.which("bash") is None,
                    reason="needs bash and xz, as a GPU machine has")
def test_grid_session_script_trains_its_grids_in_a_detached_chain_and_packs_their_records(tmp_path):
    """benchmarks/sessions/grid.sh, as a lent GPU runs it (nvidia-smi and the MPS daemon faked): `start`
    copies the tree, unpacks each grid's shards into results/<config name>/data, launches the grids one
    after another in a chain that outlives the call, and packs every record of those presets (no
    checkpoints, no shards, nothing that came with the tree) with COMMIT as each run's commit; a "cmd:" job
    runs as given, and one marked "bg:" beside the rest (the chain waits for it); `wait` on a machine with no
    session says so."""
    import json
    import subprocess
    import tarfile

    repo, fake, out, session = tmp_path / "repo", tmp_path / "bin", tmp_path / "out", tmp_path / "session"
    for path in (fake, out, repo / "configs", repo / ".carry", repo / "benchmarks" / "sessions"):
        path.mkdir(parents=True)
    root = BENCH.parent
    shutil.copytree(root / "src", repo / "src")
    shutil.copy(root / "config.yaml", repo / "configs" / "tiny.yaml")
    for script in ("bench_grid.py", "sessions/grid.sh"):
        shutil.copy(BENCH / script, repo / "benchmarks" / script)
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'FAKE GPU, 81559, 0'\n")
    (fake / "nvidia-cuda-mps-control").write_text("#!/bin/sh\nexit 0\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    with tarfile.open(repo / ".carry" / "none.tar.xz", "w:xz"):
        pass  # the default config's shards are made on the spot from the embedded corpus
    path = f"{fake}:{Path(sys.executable).parent}:{os.environ['PATH']}"  # python3: this interpreter's
    env = {**os.environ, "PATH": path, "OUT": str(out), "GRID_SESSION_DIR": str(session),
           "COMMIT": "abc1234"}
    grid = "-- train.steps=12 train.eval_every=6 train.batch_size=2 train.grad_accum=1 studies.lr.seeds=[0,1]"
    jobs = [f"tiny none 1 --studies lr --variants baseline --seeds 0 --lrs 0.01 {grid}",
            f"tiny none 1 --studies lr --variants oec_center --seeds 0 --lrs 0.01 {grid}",
            "bg:cmd:sleep 3 && mkdir -p results/probe && echo measured > results/probe/out.txt"
            " && echo weights > results/probe/init.pt"]
    (repo / "results" / "committed").mkdir(parents=True)
    (repo / "results" / "committed" / "old.txt").write_text("a record that came with the tree\n")
    script = ["bash", "benchmarks/sessions/grid.sh"]
    done = subprocess.run([*script, "start", "300", *jobs], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "nothing running" in done.stdout
    with tarfile.open(out / "records.tar.xz") as tar:
        names = tar.getnames()
        summaries = sorted(n for n in names if n.endswith("summary.json"))
        assert summaries == ["results/default/runs/lr/baseline/L2_lr0.01_s0/summary.json",
                             "results/default/runs/lr/oec_center/L2_lr0.01_s0/summary.json"]
        assert "results/probe/out.txt" in names and "results/committed/old.txt" not in names  # this session's only
        assert "results/probe/init.pt" not in names  # weights stay behind, listed in left_out.txt
        assert not [n for n in names if "/data/" in n or n.endswith(("ckpt.pt", "model.pt"))]
        commits = {json.load(tar.extractfile(n))["provenance"]["git_commit"] for n in summaries}
    assert commits == {"abc1234"}
    with tarfile.open(out / "logs.tar.xz") as tar:
        assert {"1-tiny.log", "2-tiny.log", "3-cmd.log", "chain.sh", "chain.log"} <= set(tar.getnames())
        assert "results/probe/init.pt" in tar.extractfile("left_out.txt").read().decode()
        assert tar.extractfile("chain.log").read().decode().count("exit 0") == 3  # each job's exit status
    # a second start over a finished session keeps the first one's folder
    again = subprocess.run([*script, "start", "300", jobs[0]], cwd=repo, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and len(list(tmp_path.glob("session.*"))) == 1, again.stdout + again.stderr
    bad = subprocess.run([*script, "start", "300", "nosuch none 1"], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "no configs/nosuch.yaml" in bad.stdout and (session / "env.sh").exists()
    shutil.rmtree(session)
    waited = subprocess.run([*script, "wait", "5"], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert waited.returncode == 3 and "no session on this machine" in waited.stdout
