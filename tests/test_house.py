"""The shape of the code: methods declared once, one source of truth for the config, light
planning imports, presets that hold only their differences, overrides with types."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from stabilab import config as C
from stabilab.config import RunConfig, Section, load_run_config, parse_overrides
from stabilab.errors import UserError
from stabilab.experiment import Experiment, grokking_runs, load_experiment, run_config, runs
from stabilab.methods import BASELINE, BY_NAME, METHODS, label, markdown_table, post_step_hooks, variants_of

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "stabilab"


def all_sections() -> list[type[BaseModel]]:
    """Every config model reachable from the experiment config."""
    seen: list[type[BaseModel]] = []

    def visit(tp):
        for member in C._unwrap(tp):
            args = typing.get_args(member)
            if isinstance(member, type) and issubclass(member, BaseModel):
                if member not in seen:
                    seen.append(member)
                    for f in member.model_fields.values():
                        visit(f.annotation)
            for a in args:
                visit(a)

    visit(Experiment)
    return seen


def test_every_config_field_has_a_one_line_doc_and_the_schema_is_generated_from_them():
    sections = all_sections()
    assert RunConfig in [s for s in sections] or C.ModelConfig in sections
    for model in sections:
        assert issubclass(model, Section), model
        for name, f in model.model_fields.items():
            assert f.description and "\n" not in f.description, f"{model.__name__}.{name} has no one-line doc"
    schema = json.loads(subprocess.run([sys.executable, "-m", "stabilab.cli", "schema"], capture_output=True,
                                       text=True, check=True).stdout)
    spam = schema["$defs"]["SPAMConfig"]["properties"]["threshold"]
    assert spam["minimum"] == 0 and spam["default"] == 5000.0 and spam["description"].startswith("theta")
    assert schema["$defs"]["OptimConfig"]["properties"]["lr"]["exclusiveMinimum"] == 0
    assert schema["$defs"]["ModelConfig"]["additionalProperties"] is False


def test_each_method_is_declared_once_with_keys_that_exist():
    defaults = C.leaves(C.defaults())
    names = [m.name for m in (BASELINE, *METHODS)]
    assert len(set(names)) == len(names)
    assert len({m.label for m in METHODS}) == len(METHODS)
    assert len({m.colour for m in (BASELINE, *METHODS)}) == len(names)
    for m in METHODS:
        assert m.part in ("model", "loss", "optim", "post_step", "metrics")
        assert m.colour.lower() != "#d62728", "red marks divergence"
        for key in m.keys:
            assert key in defaults or any(k.startswith(key + ".") for k in defaults), (m.name, key)
        assert set(C.leaves(m.overlay)) <= set(defaults), m.name
        assert list(m.overlay) == [m.part] or m.part == "metrics", (m.name, "overlay section != part")
    assert label("mlra+oec_center") == "MLRA + μ-centering" and label("custom") == "custom"


def test_method_colours_are_told_apart_and_none_reads_as_the_divergence_red():
    """Any two methods can share a figure: their colours (and the baseline's) differ by at least 40 in
    RGB distance, and each is at least 90 from the red that marks divergence."""
    from itertools import combinations

    from stabilab.figures.style import DIVERGED

    def rgb(hex_colour: str) -> tuple[int, ...]:
        return tuple(int(hex_colour.lstrip("#")[i:i + 2], 16) for i in (0, 2, 4))

    def distance(a: str, b: str) -> float:
        return sum((x - y) ** 2 for x, y in zip(rgb(a), rgb(b))) ** 0.5

    methods = (BASELINE, *METHODS)
    close = [(a.name, b.name) for a, b in combinations(methods, 2) if distance(a.colour, b.colour) < 40]
    assert not close, close
    assert all(distance(m.colour, DIVERGED) >= 90 for m in methods)


def test_no_method_reads_as_the_baseline_grey():
    """Every method shares figures with the baseline: each colour is at least 75 in RGB distance from the
    baseline's dark grey (qk-norm's navy, 63 away, could not be told from it in two_instabilities)."""
    def rgb(hex_colour: str) -> tuple[int, ...]:
        return tuple(int(hex_colour.lstrip("#")[i:i + 2], 16) for i in (0, 2, 4))

    base = rgb(BASELINE.colour)
    near = [m.name for m in METHODS if sum((x - y) ** 2 for x, y in zip(rgb(m.colour), base)) ** 0.5 < 75]
    assert not near, near


def test_post_step_methods_run_as_hooks_from_their_declaration():
    centering = load_run_config({"post_step": {"mu_centering": True}})
    hooks = post_step_hooks(centering)
    assert [h.__name__ for h in hooks] == ["center_output_embedding"]
    assert post_step_hooks(load_run_config({})) == []
    trainer_source = (SRC / "train" / "trainer.py").read_text()
    assert "mu_centering" not in trainer_source  # the loop knows hooks, not methods


def test_no_overlay_name_is_hard_coded_outside_methods_py():
    """Variant names that are not also config values (such as 'spam', an optimizer name) may
    appear in quotes only in methods.py."""
    literals = {str(a) for model in all_sections() for f in model.model_fields.values()
                for a in C._literals(f.annotation)}
    fields = {name for model in all_sections() for name in model.model_fields}  # e.g. optim.perpgrad
    values = {str(v) for v in C.leaves(C.defaults()).values()} | literals | fields
    names = [m.name for m in METHODS if m.name not in values]
    assert {"oec_center", "zloss", "softcap"} <= set(names)
    pattern = re.compile(r"""["'](""" + "|".join(map(re.escape, names)) + r""")["']""")
    files = [p for p in SRC.rglob("*.py") if p.name != "methods.py"] + list((ROOT / "workflow").rglob("*.smk"))
    files += [ROOT / "Snakefile", *(ROOT / "benchmarks").glob("*.py")]
    found = [(str(p.relative_to(ROOT)), m.group(0)) for p in files for m in pattern.finditer(p.read_text())]
    assert not found


def test_the_readme_methods_table_is_the_generated_one():
    assert markdown_table() in (ROOT / "README.md").read_text(), "run: stabilab methods --markdown"



def test_methods_md_writes_weight_decay_with_the_sign_that_decays():
    """optim.param_groups decays by p <- p (1 - s_t λ) (independent) or p (1 - lr_t wd): every update
    rule in METHODS.md subtracts its λ θ term, none adds it (θ - s_t(η Δ - λ θ) grows the weights)."""
    rules = re.findall(r"`θ ← θ − [^`]*`", (ROOT / "docs" / "METHODS.md").read_text())
    assert len(rules) >= 2 and all("+ λ θ)" in r and "− λ θ" not in r for r in rules), rules

def test_no_source_module_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long


def test_planning_and_help_import_no_torch_or_matplotlib():
    code = ("import sys; from stabilab.cli import build_parser; build_parser(); "
            "import stabilab.experiment, stabilab.studies, stabilab.methods, stabilab.layout, stabilab.shards; "
            "import stabilab.grokking.config, stabilab.grokking.figures; "
            "import snakemake_logger_plugin_stabilab; "  # the logger plugin: imported whenever Snakemake starts
            "print(sorted(m for m in ('torch', 'matplotlib', 'pandas', 'seaborn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    smk = "\n".join(p.read_text() for p in (ROOT / "workflow" / "rules").glob("*.smk"))
    imported = set(re.findall(r"^from (stabilab[\w.]*) import", smk, re.M))
    assert imported <= {"stabilab.errors", "stabilab.experiment", "stabilab.grokking.config",
                        "stabilab.grokking.figures", "stabilab.layout", "stabilab.shards", "stabilab.studies"}


def test_atomic_writes_and_run_folder_pattern_are_written_once():
    sources = {p: p.read_text() for p in SRC.rglob("*.py")}
    renames = [str(p.relative_to(SRC)) for p, s in sources.items() if "os.replace(" in s or ".replace(out" in s]
    assert renames == ["io.py"]
    patterns = [str(p.relative_to(SRC)) for p, s in sources.items() if "_lr{" in s]
    assert patterns == ["layout.py"]
    assert not any("_lr{" in p.read_text() for p in (ROOT / "workflow" / "rules").glob("*.smk"))


# ----------------------------------------------------------------------------- overrides and presets


def test_overrides_from_the_command_line_have_yaml_types():
    assert parse_overrides(["train.steps=50", "optim.grad_clip=null", "model.mlra.targets=[q, k]",
                            "optim.lr=1e-3", "model.tie_embeddings=false"]) == {
        "train": {"steps": 50}, "optim": {"grad_clip": None, "lr": 1e-3},
        "model": {"mlra": {"targets": ["q", "k"]}, "tie_embeddings": False}}
    with pytest.raises(UserError, match="bad override 'steps'"):
        parse_overrides(["steps"])
    cfg = load_experiment(ROOT / "config.yaml", parse_overrides(["train.steps=7", "studies.lr.seeds=[0,1]"]))
    assert cfg["train"]["steps"] == 7 and {r.seed for r in runs(cfg) if r.study == "lr"} == {0, 1}
    cfg = load_experiment(ROOT / "config.yaml", {"set": "train.steps=9 'optim.grad_clip=null'"})
    assert cfg["train"]["steps"] == 9 and cfg["optim"]["grad_clip"] is None and "set" not in cfg
    proc = subprocess.run([sys.executable, "-m", "stabilab.cli", "check-config", str(ROOT / "config.yaml"),
                           "train.steps=many"], capture_output=True, text=True)
    assert proc.returncode == 2 and "bad value for config key 'train.steps': 'many'" in proc.stderr


def test_a_preset_holds_only_its_differences(tmp_path):
    base = yaml.safe_load((ROOT / "config.yaml").read_text())
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    preset = {"base": "base.yaml", "name": "small", "train": {"steps": 30},
              "studies": {"only": {"kind": "compare", "variants": ["baseline", "zloss"], "depths": [1],
                                   "lrs": [1e-3]}}}
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "small.yaml").write_text(yaml.safe_dump({**preset, "base": "../base.yaml"}))
    cfg = load_experiment(tmp_path / "presets" / "small.yaml")
    assert list(cfg["studies"]) == ["only"]  # the base's studies are not inherited
    run = load_run_config(run_config(cfg, runs(cfg)[1], "s"))
    assert run.train.steps == 30 and run.train.batch_size == base["train"]["batch_size"]
    assert run.model.n_embd == base["model"]["n_embd"] and run.loss.z_loss == 1e-4
    (tmp_path / "loop.yaml").write_text(yaml.safe_dump({"base": "loop.yaml", "name": "x"}))
    with pytest.raises(UserError, match="cycle"):
        load_experiment(tmp_path / "loop.yaml")


def test_a_preset_has_no_grokking_study_unless_it_declares_one():
    """configs/oec.yaml (base: ../config.yaml) had inherited the default's 4 grokking runs, and trained
    them into the committed results/oec/."""
    oec = load_experiment(ROOT / "configs" / "oec.yaml")
    assert "grokking" not in oec and grokking_runs(oec) == []
    assert len(grokking_runs(load_experiment(ROOT / "config.yaml"))) == 4
    assert len(grokking_runs(load_experiment(ROOT / "configs" / "grokking_full.yaml"))) == 12


def test_the_paper_preset_defines_no_variants_of_its_own():
    preset = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    assert "variants" not in preset and preset["base"] == "../config.yaml"
    cfg = load_experiment(ROOT / "configs" / "paper.yaml")
    assert set(variants_of(cfg)) >= set(BY_NAME)


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                                        if "studies" in yaml.safe_load(p.read_text())))
def test_every_preset_resolves_every_run(preset):
    """A preset that names an unknown variant, a misspelt key or a wrong type fails here, not on the GPU."""
    cfg = load_experiment(ROOT / "configs" / preset)
    grid = runs(cfg)
    assert grid and all(run_config(cfg, r, "s")["optim"]["lr"] == r.lr for r in grid)


def test_runtime_choices_are_not_part_of_a_run(tmp_path):
    cfg = load_experiment(ROOT / "config.yaml")
    first = runs(cfg)[0]
    plain = run_config(cfg, first, "s")
    cfg2 = load_experiment(ROOT / "config.yaml", {"runtime": {"trackers": ["wandb"], "device": "cpu",
                                                               "keep_checkpoint": True, "compile": False}})
    assert run_config(cfg2, first, "s") == plain
    assert not set(C.RuntimeConfig.model_fields) & set(C.TrainConfig.model_fields)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    import re

    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def test_every_relative_link_in_the_readme_and_docs_resolves():
    """Files and folders exist, and a #fragment names a heading of its page (as the forge renders it)."""
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
    broken = []
    for page in pages:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", text, flags=re.S)):
            if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                continue
            path, _, fragment = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif fragment and dest.suffix == ".md":
                anchors = {_anchor(h) for h in re.findall(r"^#+ (.*)$", dest.read_text(), flags=re.M)}
                if fragment not in anchors:
                    broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
