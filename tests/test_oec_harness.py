"""benchmarks/oec_vs_official.py: its pure parts always (OEC's data format, our batch starts, the
weight conversion, the drift metrics against float64 loops, OEC's config and schedule); an end-to-end
CPU smoke run beside the OEC code only when STABILAB_OEC_OFFICIAL names an official checkout
(STABILAB_OEC_PYTHONPATH: where its extra packages, rotary-embedding-torch and einops, are)."""

from __future__ import annotations

import importlib.util
import math
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
OFFICIAL = os.environ.get("STABILAB_OEC_OFFICIAL", "")


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("oec_vs_official", BENCH / "oec_vs_official.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["oec_vs_official"] = module
    spec.loader.exec_module(module)
    return module


def test_our_shards_in_oec_format_round_trip(harness, tiny_data, tmp_path):
    from stabilab.model import padded_vocab

    files = harness.write_oec_data(tiny_data["shards"], tmp_path, padded_vocab(300))
    assert files["train"].name == "openwebtext_train_000001.bin" and files["val"].name == "openwebtext_val_000000.bin"
    for split in ("train", "val"):
        ours = np.memmap(Path(tiny_data["shards"]) / f"{split}.bin", dtype=tiny_data["meta"]["dtype"], mode="r")
        theirs = harness.read_oec_tokens(tmp_path, split)  # as OEC's get_batch reads it: np.memmap uint16
        assert theirs.dtype == np.uint16 and np.array_equal(np.asarray(theirs), np.asarray(ours))
        assert files[split].stat().st_size == 2 * tiny_data["meta"]["tokens"][split]
    with open(files["meta"], "rb") as f:
        assert pickle.load(f) == {"vocab_size": 320}


def test_train_starts_are_our_trainer_batches(harness, tiny_data):
    """The starts served to OEC's get_batch give exactly our trainer's windows (x = data[s:s+T],
    y = data[s+1:s+1+T], OEC's slicing)."""
    from stabilab.shards import train_batch

    tokens = np.memmap(Path(tiny_data["shards"]) / "train.bin", dtype=tiny_data["meta"]["dtype"], mode="r")
    T, B = 16, 5
    for step, micro in ((0, 0), (7, 0), (7, 1), (123, 3)):
        starts = harness.train_starts(len(tokens), 4, step, micro, B, T)
        x, y = train_batch(tokens, 4, step, micro, B, T)
        ox = torch.stack([torch.from_numpy(tokens[i:i + T].astype(np.int64)) for i in starts])
        oy = torch.stack([torch.from_numpy(tokens[i + 1:i + 1 + T].astype(np.int64)) for i in starts])
        assert torch.equal(ox, x) and torch.equal(oy, y)
        assert starts.max() < len(tokens) - T  # inside OEC's torch.randint range [0, len - T)


def _oec_state_dict(n_layer=2, d=32, hidden=256, rows=320, seed=0):
    """Random tensors under the OEC model's parameter names and shapes (nanoGPT/model.py)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"transformer.wte.weight": torch.randn(rows, d, generator=g),
          "transformer.ln_f.weight": torch.randn(d, generator=g),
          "lm_head.embedding.weight": torch.randn(rows, d, generator=g)}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        sd.update({p + "ln_1.weight": torch.randn(d, generator=g), p + "ln_2.weight": torch.randn(d, generator=g),
                   p + "attn.c_attn.weight": torch.randn(3 * d, d, generator=g),
                   p + "attn.c_proj.weight": torch.randn(d, d, generator=g),
                   p + "attn.q_layernorm.weight": torch.randn(d // 2, generator=g),
                   p + "attn.k_layernorm.weight": torch.randn(d // 2, generator=g),
                   p + "attn.rotary.freqs": torch.randn(4, generator=g),
                   p + "mlp.W.weight": torch.randn(hidden, d, generator=g),
                   p + "mlp.V.weight": torch.randn(hidden, d, generator=g),
                   p + "mlp.W_2.weight": torch.randn(d, hidden, generator=g)})
    return {"_orig_mod." + k: v for k, v in sd.items()}  # as a compiled model saves them


def test_oec_weights_load_into_our_model(harness):
    from stabilab.config import ModelConfig
    from stabilab.model import GPT

    cfg = ModelConfig(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=32, tie_embeddings=False,
                      qk_norm="layernorm", position="rope", rope_fraction=0.5, mlp="swiglu", init="oec")
    sd = _oec_state_dict()
    ours = harness.oec_to_ours(sd)
    GPT(cfg).load_state_dict(ours)  # strict: every key, every shape
    W, V = sd["_orig_mod.transformer.h.1.mlp.W.weight"], sd["_orig_mod.transformer.h.1.mlp.V.weight"]
    assert torch.equal(ours["blocks.1.mlp.c_fc.weight"], torch.cat([W, V]))  # gate (silu'd) first, as SwiGLU.forward


def test_drift_metrics_against_float64_loops(harness):
    """OEC's conventions (nanoGPT/train.py analyze_final_hidden_states, get_mu_norms) and ours
    (stabilab.metrics), each written out in float64 with explicit loops."""
    g = torch.Generator().manual_seed(3)
    B, T, d, rows, vocab = 2, 5, 6, 11, 9
    h = torch.randn(B, T, d, generator=g, dtype=torch.float64) + 0.7
    E = torch.randn(rows, d, generator=g, dtype=torch.float64) + 0.3
    y = torch.randint(0, vocab, (B, T), generator=g)
    got = harness.drift_metrics(h.float(), E.float(), vocab, y)
    hs = [h[b, t] for b in range(B) for t in range(T)]
    mu_all = sum(E[j] for j in range(rows)) / rows
    mu_real = sum(E[j] for j in range(vocab)) / vocab
    hbar = sum(hs) / len(hs)
    logits = [[float(hi @ E[j]) for j in range(rows)] for hi in hs]
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    want = {
        "mu_all": float(mu_all.norm()), "mu_real": float(mu_real.norm()),
        "logits_mean_all": sum(sum(r) / rows for r in logits) / len(hs),  # mean(mean(lgt, -1), 0)
        "logits_mean_real": sum(sum(r[:vocab]) / vocab for r in logits) / len(hs),
        "hbar_norm": float(hbar.norm()), "cos_hbar_mu_all": cos(hbar, mu_all), "cos_hbar_mu_real": cos(hbar, mu_real),
        "hidden_norm": sum(float(hi.norm()) for hi in hs) / len(hs),
        "hidden_mu_cos": sum(cos(hi, mu_real) for hi in hs) / len(hs),
        "ce_all": sum(math.log(sum(math.exp(v) for v in r)) - r[int(t)] for r, t in zip(logits, y.reshape(-1)))
        / len(hs),
    }
    assert set(want) <= set(got)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=2e-5, abs=1e-6), k


def test_oec_config_and_schedule(harness, tiny_data, tmp_path):
    """The OEC run config is Python its configurator can exec, with our run's sizes and schedule;
    OEC's get_lr_decayed (oec_lr) equals ours with optim.warmup_plus_one."""
    from stabilab.config import load_run_config
    from stabilab.optim import lr_at

    args = harness.parse_args(["--official", str(tmp_path), "--tiny", "--min-lr", "1e-5"])
    for arm in ("ours", "ours_matched"):
        run = harness.our_run_config(args, 0.3, tiny_data["shards"], arm)
        run["data"].update(tokenizer="bpe", vocab_size=300)
        cfg = load_run_config(run).with_vocab(300)
        assert cfg.model.train_padding_rows == cfg.optim.warmup_plus_one == (arm == "ours_matched")
    assert cfg.train.steps == 40 and cfg.model.n_embd == 32 and cfg.train.metrics_every == 10
    scope: dict = {}
    exec(harness.oec_config_text(cfg, 0.3, args, "cpu", "out"), {}, scope)
    assert scope["learning_rate"] == 0.3 and scope["min_lr"] == 1e-5 and scope["warmup_iters"] == 4
    assert scope["max_iters"] == scope["lr_decay_iters"] == 40 and scope["eval_interval"] == 10
    assert scope["batch_size"] == 4 and scope["block_size"] == 32 and scope["dataset"] == "openwebtext"
    assert scope["weight_decay"] == 0.0 and scope["independent_weight_decay"] is False
    assert all(math.isclose(harness.oec_lr(t, 0.3, 4, 40, 1e-5), lr_at(t, cfg.optim, 40), rel_tol=1e-12)
               for t in range(41))


@pytest.mark.skipif(not OFFICIAL, reason="STABILAB_OEC_OFFICIAL (an official OEC checkout) not set")
def test_smoke_beside_the_official_code(harness, tmp_path):
    """Tiny CPU run of all three arms at LR 0.1 for 20 steps: both sides start from OEC's initial
    weights and see the same batches, so the matched arm follows OEC's code closely."""
    argv = ["--official", OFFICIAL, "--official-pythonpath", os.environ.get("STABILAB_OEC_PYTHONPATH", ""),
            "--tiny", "--device", "cpu", "--threads", "1", "--lrs", "0.1", "--steps", "20",
            "--out", str(tmp_path / "out")]
    rows = harness.main(argv)
    by = {(r["arm"], r["step"]): r for r in rows}
    assert {s for _, s in by} == {0, 10, 20}
    for arm in ("ours", "ours_matched"):
        assert by[(arm, 0)]["mu_all"] == pytest.approx(by[("official", 0)]["mu_all"], rel=1e-6)
        # the pipeline's own mu_norm: over its output_embedding(), which has the padding rows when matched
        mu = "mu_all" if arm == "ours_matched" else "mu_real"
        assert by[(arm, 20)]["pipeline_mu_norm"] == pytest.approx(by[(arm, 20)][mu], rel=1e-5)
    assert all(by[("official", s)]["h_ours_rel_diff"] < 1e-5 for s in (0, 10, 20))
    for k in ("ce_all", "mu_all", "logits_mean_all", "hbar_norm"):
        assert by[("ours_matched", 10)][k] == pytest.approx(by[("official", 10)][k], rel=1e-2), k
    assert (tmp_path / "out" / "comparison.md").read_text().count("| official |") == 3
    assert not list((tmp_path / "out" / "lr0.1" / "official" / "out").glob("ckpt_*.pt"))  # read, then removed
