"""Config validation: unknown keys and bad values stop with one line naming the key."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stabilab.config import RunConfig, load_run_config, validated
from stabilab.errors import UserError
from stabilab.experiment import check_runs, validate
from stabilab.methods import variant_overlay

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((ROOT / "config.yaml").read_text())


def edited(path: str, value) -> dict:
    cfg = copy.deepcopy(DEFAULT)
    *parents, last = path.split(".")
    node = cfg
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return cfg


def test_default_config_is_valid():
    validate(DEFAULT)
    assert check_runs(DEFAULT)


@pytest.mark.parametrize("path, value, message", [
    ("model.n_layers", 4, "unknown config key 'model.n_layers' (allowed: "),
    ("runtime.device", "tpu", "bad value for config key 'runtime.device': 'tpu' (allowed: 'auto', 'cpu', 'cuda')"),
    ("train.device", "cuda", "unknown config key 'train.device' (allowed: steps, "),  # runtime, not run config
    ("train.steps", True, "bad value for config key 'train.steps': True"),
    ("name", "..", "bad value for config key 'name': '..'"),
    ("studies.depth.kind", "width", "bad value for config key 'studies.depth.kind': 'width' (allowed: 'depth', "),
    ("studies.depth.seeds", [0, 0], "bad value for config key 'studies.depth.seeds'"),
    ("tokenizer.kind", "sentencepiece",
     "bad value for config key 'tokenizer.kind': 'sentencepiece' (allowed: 'bpe', 'gpt2', 'hf')"),
    ("data.source", "s3", "bad value for config key 'data.source'"),
    ("optim.lr", -1, "bad value for config key 'optim.lr'"),
    ("colour", "red", "unknown config key 'colour'"),
    ("variants.mlra", {"model": {"mlra": {"rnk": 2}}}, "unknown config key 'variants.mlra.model.mlra.rnk'"),
])
def test_schema_errors_name_the_key(path, value, message):
    with pytest.raises(UserError) as err:
        validate(edited(path, value))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_variant_in_a_study():
    cfg = edited("studies.depth.variants", ["baseline", "mlra2"])
    with pytest.raises(UserError, match="unknown variant 'mlra2' \\(defined: "):
        validate(cfg)


def test_composition_and_conflicts():
    variants = {"a": {"optim": {"name": "spam"}}, "b": {"optim": {"name": "adamw"}}, "c": {"loss": {"z_loss": 1e-4}}}
    assert variant_overlay("a+c", variants) == {"optim": {"name": "spam"}, "loss": {"z_loss": 1e-4}}
    with pytest.raises(UserError, match="variants 'a' and 'b' cannot be combined in 'a\\+b': both set optim.name"):
        variant_overlay("a+b", variants)


def test_semantic_errors_of_resolved_runs():
    cfg = edited("studies.depth.variants", ["stablemax+zloss"])
    with pytest.raises(UserError, match="stablemax with loss.z_loss"):
        check_runs(cfg)
    cfg = edited("model.n_head", 5)  # 64 is not divisible by 5
    with pytest.raises(UserError, match="divisible"):
        check_runs(cfg)


def test_run_config_rejects_unknown_keys_and_types():
    with pytest.raises(UserError, match="unknown config key 'train.stepz'"):
        validated(RunConfig, {"train": {"stepz": 3}})
    with pytest.raises(UserError, match="bad value for config key 'train.steps': 'many'"):
        validated(RunConfig, {"train": {"steps": "many"}})
    with pytest.raises(UserError, match="bad value for config key 'optim.grad_clip': 0"):
        validated(RunConfig, {"optim": {"grad_clip": 0}})
    cfg = load_run_config({"optim": {"lr": 1}})  # ints are fine where floats are expected
    assert isinstance(cfg.optim.lr, float)


def test_cli_prints_one_line_and_exit_code_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(edited("model.n_layers", 4)))
    proc = subprocess.run([sys.executable, "-m", "stabilab.cli", "check-config", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown config key 'model.n_layers'")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_snakemake_stops_on_a_bad_config_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(edited("runtime.device", "tpu")))
    proc = subprocess.run(["snakemake", "-n", "--configfile", str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "config error: bad value for config key 'runtime.device': 'tpu'" in out
    assert "Traceback" not in out


def test_a_study_named_dotdot_is_refused():
    """A study's name is a folder under results/<name>/runs and figures/<name>/."""
    cfg = copy.deepcopy(DEFAULT)
    cfg["studies"][".."] = {"kind": "lr", "variants": ["baseline"], "depths": [1], "lrs": [1e-3]}
    with pytest.raises(UserError, match="not '.' or '..'"):
        validate(cfg)


def test_a_variants_label_reaches_its_studies_but_not_its_runs(tmp_path):
    """`label:` on a config variant is a legend name: copied into each study that runs the variant
    (also as part of 'a+b'), never into a run's config (changing it re-runs nothing)."""
    from stabilab.experiment import load_experiment, run_config, runs

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "name": "labels",
        "variants": {"adam": {"label": "Adam"}, "clip": {"label": "clipping", "optim": {"grad_clip": 0.5}}},
        "studies": {"a": {"kind": "compare", "variants": ["adam", "clip+oec_center"], "depths": [1],
                          "lrs": [1e-3]},
                    "b": {"kind": "compare", "variants": ["baseline"], "depths": [1], "lrs": [1e-3]}},
    }))
    config = load_experiment(path)
    assert config["studies"]["a"]["labels"] == {"adam": "Adam", "clip": "clipping"}
    assert not config["studies"]["b"].get("labels")
    for run in runs(config):
        resolved = run_config(config, run, "shards")
        assert "label" not in json.dumps(resolved)
        if run.variant == "clip+oec_center":
            assert resolved["optim"]["grad_clip"] == 0.5
    path.write_text(path.read_text().replace("label: Adam", "label: ''"))
    with pytest.raises(UserError, match="variants.adam.label"):
        load_experiment(path)


def test_the_default_experiment_is_a_smoke_test_and_no_preset_inherits_that(tmp_path):
    """`smoke_test: true` in config.yaml reaches each of its studies (what the tables, figures and summary
    read), never a run's config; a preset overlaying config.yaml (`base:`) is no smoke test unless it says so."""
    from stabilab.experiment import load_experiment, run_config, runs

    default = load_experiment(ROOT / "config.yaml")
    assert default["smoke_test"] is True
    assert all(spec["smoke_test"] is True for spec in default["studies"].values())
    assert all("smoke_test" not in json.dumps(run_config(default, run, "shards")) for run in runs(default))
    for preset in ("paper", "oec", "spam", "two_instabilities"):  # base: ../config.yaml, directly or through oec
        config = load_experiment(ROOT / "configs" / f"{preset}.yaml")
        assert not config.get("smoke_test") and not any("smoke_test" in s for s in config["studies"].values())
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"base": str(ROOT / "config.yaml"), "name": "mine", "smoke_test": True,
                                    "studies": {"a": {"kind": "compare", "variants": ["baseline"], "depths": [1],
                                                      "lrs": [1e-3]}}}))
    assert load_experiment(mine)["studies"]["a"]["smoke_test"] is True
