"""stabilab export: a run's model as a transformers folder computes the run's own logits."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import LLAMA, tiny_run, write_run
from stabilab.cli import main
from stabilab.config import load_run_config
from stabilab.train import Trainer

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason='needs the export extra: pip install -e ".[export]"')

CASES = {
    "gpt2-tied-bias": {"bias": True},
    "gpt2-untied-nobias": {"tie_embeddings": False},
    "llama-untied": {**LLAMA, "tie_embeddings": False},
    "llama-tied-bias": {**LLAMA, "bias": True, "mlp_hidden": 48},
}


def hf_logits(out, idx: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out).double().eval()
    with torch.no_grad():
        return hf(idx).logits.double()  # transformers < 4.45 returns Llama's logits in float32


def random_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (3, 32), generator=torch.Generator().manual_seed(1))


@needs_transformers
@pytest.mark.parametrize("model", CASES.values(), ids=CASES.keys())
def test_exported_model_computes_the_runs_logits(tiny_data, tmp_path, model, capsys, one_torch_thread):
    gpt = write_run(tmp_path / "run", tiny_data, **model)
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    family = "LlamaForCausalLM" if model.get("position") == "rope" else "GPT2LMHeadModel"
    assert config["architectures"] == [family] and config["vocab_size"] == 300
    assert (tmp_path / "hf" / "model.safetensors").exists()
    idx = random_ids(300)
    with torch.no_grad():
        ours = gpt.double()(idx)
    theirs = hf_logits(tmp_path / "hf", idx)
    assert theirs.shape == ours.shape == (3, 32, 300)
    # float64 throughout, except Llama's RoPE angles, which transformers computes in float32
    tol = 1e-5 if family == "LlamaForCausalLM" else 1e-10
    assert torch.allclose(theirs, ours, rtol=0, atol=tol), float((theirs - ours).abs().max())
    assert ours.std() > 0.3  # logits far from zero: a misplaced weight shows


@needs_transformers
def test_a_trained_run_exports_with_its_tokenizer(tiny_data, tmp_path, capsys, one_torch_thread):
    """Through the trainer: 2 steps, model.pt as it writes it; the bpe tokenizer goes along."""
    from transformers import AutoTokenizer

    from stabilab.inference import load_run

    tok_file = str(tiny_data["root"] / "tokenizer.json")
    run = tiny_run(tiny_data["shards"], train={"steps": 2, "eval_every": 2, "log_every": 1, "metrics_every": 2},
                   data={"tokenizer_file": tok_file})
    Trainer(load_run_config(run), tmp_path / "run").run()
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert f"tokenizer: {tok_file} (bpe, 300 tokens)" in capsys.readouterr().out
    _, gpt, _ = load_run(tmp_path / "run", "cpu")
    idx = random_ids(300)
    with torch.no_grad():
        assert torch.allclose(hf_logits(tmp_path / "hf", idx), gpt.double()(idx), rtol=0, atol=1e-10)
    ours, hf = tiny_data["tokenizer"], AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "the king speak fair , the queen weep ."  # " ," kept: no clean-up of spaces, as ours
    assert hf.encode(text) == ours.encode(text) and hf.decode(ours.encode(text)) == text
    assert hf.eos_token_id == hf.bos_token_id == ours.eot_id
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == ours.eot_id


@needs_transformers
def test_a_tiktoken_gpt2_run_gets_a_note_instead_of_a_tokenizer(tiny_data, tmp_path, capsys, monkeypatch):
    import tiktoken

    from stabilab.tokenizer import gpt2

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)  # the shipped ranks: no download
    write_run(tmp_path / "run", tiny_data, tokenizer=gpt2())
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert "tokenizer: tiktoken gpt2, not converted" in capsys.readouterr().out
    assert 'AutoTokenizer.from_pretrained("gpt2")' in (tmp_path / "hf" / "TOKENIZER.txt").read_text()
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vocab_size"] == 50257 and config["eos_token_id"] == config["bos_token_id"] == 50256



def scaled(part: str, factor: float):
    """An edit for write_run: the weight of each block's `part` (e.g. "mlp.c_proj") times `factor`."""

    def edit(gpt):
        for block in gpt.blocks:
            block.get_submodule(part).weight.mul_(factor)

    return edit


def planted(monkeypatch, function: str, change):
    """Export with `change` applied to what export.`function` returns: a mismatch the check must find."""
    from stabilab import export

    right = getattr(export, function)

    def wrong(*args):
        out = right(*args)
        change(out)
        return out

    monkeypatch.setattr(export, function, wrong)


def export_refused(tmp_path, capsys, what: str) -> None:
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "wrong")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: the exported {what}"), err
    assert not (tmp_path / "wrong").exists()


@needs_transformers
def test_the_tanh_gelu_is_refused_even_where_the_mlp_adds_little_to_the_logits(tiny_data, tmp_path, capsys,
                                                                              monkeypatch, one_torch_thread):
    """GPT-2's "gelu_new" is the tanh GELU, ours the exact erf one: they differ by < 5e-4. With the
    MLP's output a tenth of write_run's, that moves the logits by 1.5e-4 on the ids of seed 0, which a
    check at 1e-4 of the largest logit let through; the export of the same run with "gelu" passes."""
    write_run(tmp_path / "run", tiny_data, edit=scaled("mlp.c_proj", 0.1))
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    planted(monkeypatch, "hf_config", lambda config: setattr(config, "activation_function", "gelu_new"))
    export_refused(tmp_path, capsys, "GPT2LMHeadModel disagrees with the run's model")


@needs_transformers
def test_a_llama_with_sharp_attention_exports_over_its_whole_block(tiny_data, tmp_path, capsys, monkeypatch,
                                                                  one_torch_thread):
    """transformers computes Llama's RoPE angles in float32 whatever the model's dtype: up to position
    511 their cos and sin are up to 1.7e-5 from ours, which sharp attention (q, k, v 5 x write_run's)
    turns into logits 3.8e-4 apart, more than 1e-4 of the largest logit: a right export was refused. A
    weight off by 1e-3 (one layer's down_proj) is still caught, and so is another RoPE base (the angles)."""
    write_run(tmp_path / "run", tiny_data, edit=scaled("attn.dense", 5.0), **{**LLAMA, "block_size": 512})
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert "max |logit difference|" in capsys.readouterr().out

    with monkeypatch.context() as m:
        planted(m, "llama_state", lambda sd: sd.update({"model.layers.1.mlp.down_proj.weight":
                                                        sd["model.layers.1.mlp.down_proj.weight"] * (1 + 1e-3)}))
        export_refused(tmp_path, capsys, "LlamaForCausalLM disagrees with the run's model")
    planted(monkeypatch, "hf_config", lambda config: config.rope_parameters.update(rope_theta=10000.0))
    export_refused(tmp_path, capsys, "LlamaForCausalLM's RoPE angles differ from the run's")


REFUSED = {
    "mlra": ({"mlra": {"enabled": True}}, {}, "model.mlra.enabled=true"),
    "qk-norm": ({**LLAMA, "qk_norm": "rmsnorm"}, {}, "model.qk_norm='rmsnorm'"),
    "partial-rope": ({**LLAMA, "rope_fraction": 0.5}, {}, "model.rope_fraction=0.5"),
    "softcap": ({"logit_softcap": 30.0}, {}, "model.logit_softcap=30"),
    "stablemax": ({}, {"kind": "stablemax"}, "loss.kind='stablemax'"),
    "mask-unseen": ({"mask_unseen_tokens": True}, {}, "model.mask_unseen_tokens=true"),
    "rmsnorm-learned": ({"norm": "rmsnorm"}, {}, "model.norm='rmsnorm' with model.position='learned'"),
    "gelu-rope": ({**LLAMA, "mlp": "gelu"}, {}, "model.mlp='gelu' with model.position='rope'"),
}


@pytest.mark.parametrize("model, loss, option", REFUSED.values(), ids=REFUSED.keys())
def test_options_without_a_transformers_equivalent_are_refused_in_one_line(tiny_data, tmp_path, capsys, model,
                                                                          loss, option):
    write_run(tmp_path / "run", tiny_data, loss, **model)
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot export: {option} has no transformers equivalent")
    assert not (tmp_path / "hf").exists()


def test_without_transformers_the_error_says_how_to_install_it(tiny_data, tmp_path, capsys, monkeypatch):
    write_run(tmp_path / "run", tiny_data)
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "run")]) == 2
    assert "is the run folder or inside it" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # import transformers fails
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == 'error: stabilab export needs transformers: pip install -e ".[export]"\n'


def _another_run(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "ckpt.pt").write_bytes(b"")  # a run in progress: its config.json would be overwritten
    return tmp_path / "other"


def _a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    return tmp_path / "notes.txt"


BAD_OUT = {
    "the-run": (lambda tmp: tmp / "run", "is the run folder or inside it: export into a folder of its own"),
    "inside-the-run": (lambda tmp: tmp / "run" / "hf", "is the run folder or inside it: export into a folder of "
                       "its own"),
    "the-run-by-another-path": (lambda tmp: tmp / "run" / ".." / "run" / ".", "is the run folder or inside it"),
    "another-run": (_another_run, "is a run folder: export into a folder of its own"),
    "a-file": (_a_file, "is a file, not a folder"),
}


@pytest.mark.parametrize("out, message", BAD_OUT.values(), ids=BAD_OUT.keys())
def test_an_out_that_is_a_run_folder_or_a_file_is_refused_before_anything_is_read(tiny_data, tmp_path, capsys,
                                                                                 monkeypatch, out, message):
    from stabilab import export

    write_run(tmp_path / "run", tiny_data)
    out = out(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    def unread(*_):
        raise AssertionError("the run was read")

    monkeypatch.setattr(export, "load_run", unread)
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --out {out} ") and message in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@needs_transformers
def test_an_hf_tokenizer_run_exports_its_tokenizer_with_its_eos(tiny_data, tmp_path, capsys, one_torch_thread):
    """tokenizer.kind hf (a T5-like tokenizer.json): the export carries it, </s> as bos and eos."""
    from transformers import AutoTokenizer

    from stabilab.tokenizer import hf
    from test_paper_data import t5_like_tokenizer

    t5_like_tokenizer(tmp_path / "t5.json")
    ours = hf(file=str(tmp_path / "t5.json"))
    write_run(tmp_path / "run", tiny_data, tokenizer=ours)
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert "(hf, 300 tokens)" in capsys.readouterr().out
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert theirs.eos_token == "</s>" and theirs.eos_token_id == ours.eot_id == 1
    assert theirs("the king speaks", add_special_tokens=False)["input_ids"] == ours.encode("the king speaks")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 1
