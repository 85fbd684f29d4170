"""Typed run configuration: one source of truth for every field, its default, range and doc.

A *run* is (study, variant, depth, learning rate, seed). Its config is the experiment's base
sections, overlaid by the study's `overrides`, then by the variant's overlays (`methods.py`),
then by depth/LR/seed. Each section says which part of training it configures:

- `model`      the network (architecture options, MLRA attention, soft-capping, tying)
- `loss`       the training objective (StableMax, z-loss, mu-loss)
- `optim`      the optimizer (AdamW or SPAM, perpGrad wrapper, clipping, schedule)
- `post_step`  what runs after each optimizer step (mu-centering)
- `train`      the loop (steps, batch, logging, divergence)

Everything a run's *numbers* depend on is here; how and where it runs (device, compile,
threads, logging sinks, checkpoint keeping) is `RuntimeConfig`, which Snakemake does not track,
so toggling it never retrains a finished run.

The models are pydantic (strict: no silent type coercion; unknown keys rejected); errors are
turned into one line naming the key (`config_error`). `stabilab schema` prints the JSON schema
generated from these classes.
"""

from __future__ import annotations

import copy
import re
import types
import typing
from typing import Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from .errors import UserError


class Section(BaseModel):
    """A config mapping: strict types, unknown keys rejected, every field documented."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=False)

    def to_dict(self) -> dict:
        return self.model_dump(mode="python")


def knob(default: Any, doc: str, **limits: Any) -> Any:
    """A config field: its default, its one-line doc and its range (ge/gt/le/lt, min_length...)."""
    return Field(default, description=doc, **limits)


def section(cls: type[Section], doc: str) -> Any:
    return Field(default_factory=cls, description=doc)


_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.+-")


def _safe_name(value: str) -> str:
    if value in (".", "..") or not value or any(c not in _NAME_CHARS for c in value):
        raise ValueError("expected letters, digits and _ . + - (not '.' or '..')")
    return value


def _unique(values: list) -> list:
    if len(set(values)) != len(values):
        raise ValueError(f"duplicates in {values}")
    return values


# a name that is one safe path component (experiments, studies, variants: they name folders)
Name = typing.Annotated[str, AfterValidator(_safe_name)]


def unique_list(item: Any) -> Any:
    """A list type whose items are `item` and distinct."""
    return typing.Annotated[list[item], AfterValidator(_unique)]


def mlra_rank(cfg: ModelConfig) -> int:
    """MLRA's per-head rank: model.mlra.rank, else d_head // 2 (choice, METHODS.md §2)."""
    return cfg.mlra.rank if cfg.mlra.rank is not None else (cfg.n_embd // cfg.n_head) // 2


# ----------------------------------------------------------------------------- model


class MLRAConfig(Section):
    """MLRA (arXiv 2409.07787): per-head low-rank attention projections W_h = A_h B_h."""

    enabled: bool = knob(False, "factorize the attention projections per head")
    rank: int | None = knob(None, "per-head rank r; null: d_head // 2 (choice, METHODS.md §2)", ge=1)
    targets: list[Literal["q", "k", "v", "o"]] = knob(
        ["q", "k", "v"], "projections to factorize (choice; 'o' is the output projection)", min_length=1)


class ModelConfig(Section):
    vocab_size: int = knob(0, "set at training from the token shards (0 in configs); padded to a multiple of 64",
                           ge=0)
    block_size: int = knob(64, "context length T in tokens", ge=2)
    n_layer: int = knob(2, "transformer blocks (the depth studies sweep it)", ge=1)
    n_head: int = knob(4, "attention heads", ge=1)
    n_embd: int = knob(64, "model width d", ge=1)
    bias: bool = knob(False, "biases in the linear layers and LayerNorms")
    dropout: float = knob(0.0, "dropout probability", ge=0, le=1)
    tie_embeddings: bool = knob(True, "lm_head shares wte's weight; false: a separate output embedding")
    norm: Literal["layernorm", "rmsnorm"] = knob("layernorm", "the blocks' and the final norm (learnable gain)")
    qk_norm: Literal["none", "layernorm", "rmsnorm"] = knob(
        "none", "per-head norm of q and k over d_head, learnable gain shared by the heads, before RoPE")
    position: Literal["learned", "rope"] = knob("learned", "learned position embedding (wpe) or rotary (RoPE)")
    rope_fraction: float = knob(1.0, "share of each head's dims RoPE rotates (OEC code: 0.5)", gt=0, le=1)
    rope_base: float = knob(10000.0, "RoPE base theta", gt=1)
    mlp: Literal["gelu", "swiglu"] = knob("gelu", "GELU MLP (GPT-2) or SwiGLU W2(silu(W1 x) * W3 x) (LLaMA)")
    mlp_hidden: int | None = knob(None, "MLP width; null: 4d (GELU), 256 * ceil(int(8d/3) / 256) (SwiGLU)", ge=1)
    init: Literal["gpt2", "llama", "oec"] = knob(
        "gpt2", "gpt2: N(0, 0.02), residual projections / sqrt(2L); llama: N(0, 0.02); oec: the OEC code's")
    head_fp32: bool = knob(False, "the output layer's matmul and logits in float32 under bf16 autocast")
    logit_softcap: float | None = knob(None, "Gemma 2 soft-capping c: l <- c tanh(l / c); null: off", gt=0)
    train_padding_rows: bool = knob(
        False, "the head's padding rows (vocabulary rounded up to a multiple of 64) count as output-embedding "
               "rows: the softmax, z-loss, mu, mu-loss and mu-centering run over all of them, as in the OEC "
               "code (50304 GPT-2 rows); false: masked out (never trained, never counted)")
    mask_unseen_tokens: bool = knob(
        False, "the token ids that never occur in the training split (train.bin) are masked like the padding "
               "rows: out of the softmax (cross-entropy, z-loss; validation positions with such a target are left "
               "out of the loss), mu, mu-loss, mu-centering and the logit, mu and TEV metrics; their count is in "
               "summary.json (masked_token_ids); false: every id of the vocabulary counts")
    mlra: MLRAConfig = section(MLRAConfig, "multi-head low-rank attention")


# ----------------------------------------------------------------------------- loss


class LossConfig(Section):
    kind: Literal["softmax", "stablemax"] = knob("softmax", "normalizer of the cross-entropy (StableMax paper)")
    z_loss: float = knob(0.0, "PaLM z-loss weight: + z_loss * mean(logsumexp^2); 0: off", ge=0)
    mu_loss: float = knob(0.0, "OEC mu-loss weight: + mu_loss * ||mu||^2 of the output embedding; 0: off", ge=0)


# ----------------------------------------------------------------------------- optimizer


class SPAMConfig(Section):
    """SPAM (arXiv 2501.06842): spike clipping and periodic moment reset."""

    threshold: float = knob(5000.0, "theta: clip entries with g^2 > theta * v_prev to sign(g) sqrt(theta v_prev)",
                            ge=0)
    reset_interval: int = knob(500, "Delta T: zero the moments every this many steps", ge=1)
    warmup: int = knob(150, "N: cosine LR-multiplier warmup steps after each moment reset", ge=0)
    grace: int = knob(20, "no spike clipping for this many steps after start and after each reset", ge=0)
    warmup_at_start: bool = knob(False, "also warm up at the start (official code: only after resets; choice)")


class OptimConfig(Section):
    name: Literal["adamw", "spam"] = knob("adamw", "base optimizer")
    lr: float = knob(3e-3, "peak learning rate (the LR studies sweep it)", gt=0, allow_inf_nan=False)
    betas: list[typing.Annotated[float, Field(ge=0, lt=1)]] = knob([0.9, 0.95], "Adam betas (beta1, beta2)",
                                                                  min_length=2, max_length=2)
    eps: float = knob(1e-8, "Adam epsilon", gt=0)
    weight_decay: float = knob(0.1, "weight decay on matrices (not on biases, norms and gains)", ge=0)
    weight_decay_mode: Literal["decoupled", "independent"] = knob(
        "decoupled", "decoupled: p -= lr_t wd p (PyTorch); independent: p -= s_t wd p (Wortsman et al.)")
    grad_clip: float | None = knob(1.0, "global grad-norm clip; null: no clipping", gt=0)
    warmup_steps: int = knob(20, "linear LR warmup steps", ge=0)
    warmup_plus_one: bool = knob(False, "warmup lr (t + 1) / (W + 1), as the OEC code (its nanoGPT train.py), "
                                        "instead of lr (t + 1) / W; t counts steps from 0")
    min_lr_ratio: float = knob(0.1, "cosine decay ends at lr * min_lr_ratio", ge=0, le=1)
    min_lr: float | None = knob(None, "cosine decay ends at this LR, the same for every peak LR (the OEC code's "
                                      "1e-5); null: lr * min_lr_ratio", ge=0)
    perpgrad: bool = knob(False, "wrap the optimizer with perpGrad (OrthoGrad, StableMax paper)")
    spam: SPAMConfig = section(SPAMConfig, "SPAM's hyperparameters (used when name: spam)")


class PostStepConfig(Section):
    mu_centering: bool = knob(False, "OEC: subtract the mean output-embedding row after each optimizer step")


# ----------------------------------------------------------------------------- training loop


class DivergenceConfig(Section):
    margin: float = knob(1.0, "nats above the initial loss that count as far above", gt=0)
    patience: int = knob(50, "consecutive steps (checked at log steps) above the margin", ge=1)


class EarlyWarningConfig(Section):
    """An early_warning study's labels and predictors (METHODS.md §5), fixed before the runs are seen;
    analysis only: changing them redraws the tables, never retrains."""

    rise: float = knob(0.3, "failure: the smoothed training loss at least this many nats above its running minimum",
                       gt=0)
    persist_steps: int = knob(200, "failure: for at least this many steps (or until the trainer stopped the run)",
                              ge=1)
    smooth_steps: int = knob(100, "the smoothed loss: mean of the logged training losses of the last this many steps",
                             ge=1)
    slope_steps: int = knob(200, "a predictor's slope: least-squares slope over the last this many steps", ge=2)
    leads: unique_list(typing.Annotated[int, Field(ge=1)]) = knob(
        [50, 100, 200, 300, 500, 750, 1000, 1500, 2000], "lead times N: a positive is a step at most N steps "
        "before the failure", min_length=1)
    warn_auroc: float = knob(0.75, "a metric's warning lead: the largest N up to which its AUROC stays >= this",
                             gt=0.5, le=1)
    bootstrap: int = knob(1000, "bootstrap replicates over runs (resampled within each variant, depth and LR)",
                          ge=10)
    seed: int = knob(0, "seed of the bootstrap", ge=0)


class TrainConfig(Section):
    steps: int = knob(200, "optimizer steps", ge=1)
    batch_size: int = knob(16, "sequences per micro-batch", ge=1)
    grad_accum: int = knob(1, "micro-batches per step; a multiple of processes", ge=1)
    processes: int = knob(1, "data-parallel processes (torchrun); the global batch stays batch_size * grad_accum",
                          ge=1)
    eval_every: int = knob(50, "validation loss every this many steps", ge=1)
    eval_batches: int = knob(4, "validation batches per evaluation", ge=1)
    log_every: int = knob(10, "training loss and grad norm every this many steps", ge=1)
    metrics_every: int = knob(25, "stability metrics (METHODS.md §3) every this many steps", ge=1)
    metrics_batch: int = knob(8, "sequences of the fixed metrics batch (the first of the validation set)", ge=1)
    grad_var_window: int = knob(50, "window of the grad-norm variance", ge=2)
    spike_factor: float = knob(50.0, "GSS threshold of a gradient-norm spike (SPAM paper)", gt=0)
    spike_scores: bool = knob(False, "per-element GSS (SPAM) counted by parameter kind every step, and every "
                                     "step's total grad norm in grad_norm.csv")
    checkpoint_every: int = knob(100, "write ckpt.pt every this many steps", ge=1)
    init_from: str = knob("", "model.pt of a finished run to start from (its weights; '': a fresh init)")
    dtype: Literal["auto", "float32", "bfloat16"] = knob("auto", "autocast dtype; auto: bf16 on CUDA, float32 on CPU")
    divergence: DivergenceConfig = section(DivergenceConfig, "when a run counts as diverged")

    def schedule(self, step: int) -> tuple[bool, bool, bool]:
        """Whether step `step` (counted from 1) measures the stability metrics, logs, and evaluates;
        the last step does all three."""
        last = step == self.steps
        return (step % self.metrics_every == 0 or last, step == 1 or step % self.log_every == 0 or last,
                step % self.eval_every == 0 or last)

    def checkpoints_at(self, step: int) -> bool:
        """Whether the loop writes a checkpoint after step `step` (not after the last: the run is done)."""
        return step % self.checkpoint_every == 0 and step < self.steps


class DataConfig(Section):
    shards: str = knob("", "folder with train.bin, val.bin, meta.json")
    tokenizer: Literal["bpe", "gpt2", "hf"] = knob("bpe", "tokenizer kind the shards must have been made with")
    vocab_size: int = knob(0, "tokenizer vocabulary the shards must have (0: any)", ge=0)
    tokenizer_file: str = knob("", "the run's tokenizer file: the shards' tokenizer sha256 must match ('': no check)")


class RunConfig(Section):
    """One run, fully resolved: what `stabilab train --run` receives and `config.json` holds."""

    study: Name = knob("default", "study the run belongs to")
    variant: Name = knob("baseline", "variant name ('a+b': composed)")
    seed: int = knob(0, "seed of the initialization and the batch order", ge=0)
    model: ModelConfig = section(ModelConfig, "the network")
    loss: LossConfig = section(LossConfig, "the training objective")
    optim: OptimConfig = section(OptimConfig, "the optimizer and LR schedule")
    post_step: PostStepConfig = section(PostStepConfig, "what runs after each optimizer step")
    train: TrainConfig = section(TrainConfig, "the training loop")
    data: DataConfig = section(DataConfig, "the token shards")

    def with_vocab(self, vocab: int) -> RunConfig:
        """A copy with model.vocab_size set to the shards' vocabulary (the run's own must be 0 or equal)."""
        if self.model.vocab_size not in (0, vocab):
            raise UserError(f"model.vocab_size is {self.model.vocab_size} but the shards have {vocab} tokens")
        return self.model_copy(update={"model": self.model.model_copy(update={"vocab_size": vocab})}, deep=True)


SECTIONS = ("model", "loss", "optim", "post_step", "train")


Tracker = Literal["tensorboard", "wandb", "mlflow"]  # train/sinks.py has one sink class per name
# auto (RuntimeConfig.compile_mode_on), then torch's own modes
CompileMode = Literal["auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the torch modes that record CUDA graphs


class RuntimeConfig(Section):
    """How and where a run executes: never part of the run's identity (Snakemake does not track it)."""

    device: Literal["auto", "cpu", "cuda"] = knob("auto", "auto: CUDA when available")
    compile: bool | Literal["auto"] = knob("auto", "torch.compile model, loss and optimizer updates; auto: on CUDA")
    compile_mode: CompileMode = knob(
        "auto", "torch.compile mode of the model + loss graph (choice); auto: reduce-overhead (CUDA graphs: "
                "1.96x faster for a 12-layer d-256 run on an H200, no gain at GPT-2 124M) for a run alone on "
                "one CUDA device, default with several processes (DDP) and on the CPU")
    threads: int = knob(0, "CPU threads for torch (0: torch's default)", ge=0)
    trackers: unique_list(Tracker) = knob(
        [], "experiment trackers beside metrics.jsonl: tensorboard (run folder/tensorboard), wandb (offline "
            "unless WANDB_MODE=online; run folder/wandb), mlflow (MLFLOW_TRACKING_URI, else run folder/mlruns); "
            "the environment variable STABILAB_TRACKERS=a,b replaces this list")
    keep_checkpoint: bool = knob(False, "keep ckpt.pt (weights, optimizer, RNG) after a finished run")
    keep_weights: bool = knob(True, "write the final weights to model.pt (stabilab eval, sample, train.init_from)")

    def compiles_on(self, device) -> bool:
        """Whether runs on `device` (a torch.device) are compiled: compile true, or auto on CUDA."""
        return self.compile is True or (self.compile == "auto" and device.type == "cuda")

    def compile_mode_on(self, device, world: int = 1) -> str:
        """The torch.compile mode for a run on `device` (a torch.device) in `world` processes: the
        configured one, or for auto CUDA graphs on one CUDA device (DDP's gradient all-reduce inside
        recorded graphs is untested here) and torch's default elsewhere."""
        if self.compile_mode != "auto":
            return self.compile_mode
        return "reduce-overhead" if device.type == "cuda" and world == 1 else "default"


# ----------------------------------------------------------------------------- errors as one line


def _unwrap(tp: Any) -> list[Any]:
    """The member types of an Optional/Union/Annotated annotation."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for t in typing.get_args(tp) for m in _unwrap(t)]
    return [tp]


def _step(tp: Any, key: Any) -> Any:
    """The type one loc entry below `tp` (a model's field, a dict's value, a list's item), or None."""
    for member in _unwrap(tp):
        if isinstance(member, type) and issubclass(member, BaseModel):
            if isinstance(key, str) and key in member.model_fields:
                return member.model_fields[key].annotation
        elif typing.get_origin(member) is dict and isinstance(key, str):
            return typing.get_args(member)[1]
        elif typing.get_origin(member) is list and isinstance(key, int):
            return typing.get_args(member)[0]
    return None


def _type_at(root: Any, loc: tuple) -> tuple[Any, int]:
    """(the type reached by walking `loc` from `root`, how many loc entries that took); union
    members and pydantic's own loc entries (e.g. 'function-after[...]') end the walk."""
    tp, used = root, 0
    for i, key in enumerate(loc):
        below = _step(tp, key)
        if below is None:
            break
        tp, used = below, i + 1
    return tp, used


def _literals(tp: Any) -> list:
    members = _unwrap(tp)
    if len(members) == 1 and typing.get_origin(members[0]) is list:
        members = _unwrap(typing.get_args(members[0])[0])
    values = [a for m in members if typing.get_origin(m) is Literal for a in typing.get_args(m)]
    return ([True, False] if bool in members else []) + values


def config_error(error: ValidationError, root: type[BaseModel], prefix: str = "") -> UserError:
    """One line for the first problem of a pydantic ValidationError, naming the key."""
    e = error.errors()[0]
    loc = tuple(e["loc"])
    tp, used = _type_at(root, loc)
    parts = ([prefix] if prefix else [])
    where = ".".join(parts + [str(k) for k in loc[:used]]) or "<top level>"
    value = e.get("input")
    if e["type"] == "extra_forbidden":
        parent, _ = _type_at(root, loc[:-1])
        model = next((m for m in _unwrap(parent) if isinstance(m, type) and issubclass(m, BaseModel)), None)
        allowed = ", ".join(model.model_fields) if model is not None else ""
        return UserError(f"unknown config key '{'.'.join(parts + [str(k) for k in loc])}' (allowed: {allowed})")
    if e["type"] == "missing":
        return UserError(f"missing config key '{where}'")
    if e["type"] in ("model_type", "dict_type", "model_attributes_type"):
        return UserError(f"config key '{where}' must be a mapping, got {value!r}")
    literals = _literals(tp)
    if literals and e["type"] in ("literal_error", "bool_type", "enum"):
        return UserError(f"bad value for config key '{where}': {value!r} "
                         f"(allowed: {', '.join(map(repr, literals))})")
    message = e["msg"].removeprefix("Value error, ")
    return UserError(f"bad value for config key '{where}': {value!r} ({message[0].lower() + message[1:]})")


def validated(cls: type[BaseModel], data: Any, prefix: str = "") -> Any:
    """`cls` built from `data`, or a one-line UserError naming the offending key."""
    try:
        return cls.model_validate(data)
    except ValidationError as error:
        raise config_error(error, cls, prefix) from None


# ----------------------------------------------------------------------------- run configs


def load_run_config(data: dict) -> RunConfig:
    cfg = validated(RunConfig, data)
    check_run_config(cfg)
    return cfg


def check_run_config(cfg: RunConfig) -> None:
    """The rules that span several fields (single-field ranges are on the fields)."""
    m, t = cfg.model, cfg.train
    if t.grad_accum % t.processes:
        raise UserError(f"train.grad_accum ({t.grad_accum}) must be a multiple of train.processes ({t.processes})")
    if m.n_embd % m.n_head:
        raise UserError(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
    d_head = m.n_embd // m.n_head
    if m.mlra.enabled:
        rank = mlra_rank(m)
        if not 1 <= rank < d_head:
            raise UserError(f"bad value for config key 'model.mlra.rank': {rank} "
                            f"(expected 1 <= rank < d_head = {d_head})")
    if cfg.loss.kind == "stablemax" and cfg.loss.z_loss > 0:
        raise UserError("variants cannot combine loss.kind=stablemax with loss.z_loss: z-loss penalizes "
                        "the softmax normalizer logsumexp, which StableMax does not have")


def defaults() -> dict:
    """The default of every run-config field, as a nested dict."""
    return RunConfig().to_dict()


# ----------------------------------------------------------------------------- overlays


def deep_merge(base: dict, overlay: dict) -> dict:
    """Return `base` updated by `overlay`, recursing into nested mappings."""
    out = copy.deepcopy(base)
    for key, value in (overlay or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def leaves(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'a.b.c': value} for its non-mapping values."""
    out = {}
    for key, value in d.items():
        where = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            out.update(leaves(value, where))
        else:
            out[where] = value
    return out


def nest(dotted: dict[str, Any]) -> dict:
    """{'a.b': 1} -> {'a': {'b': 1}} (the inverse of `leaves`)."""
    out: dict = {}
    for key, value in dotted.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"config override '{key}': '{part}' is not a mapping")
        node[last] = value
    return out


_YAML12_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")


def yaml12_numbers(obj: Any) -> Any:
    """Strings that YAML 1.2 reads as numbers but PyYAML (YAML 1.1) leaves as strings, such as
    `1e-3`, as floats; everything else unchanged (recursing into mappings and lists)."""
    if isinstance(obj, dict):
        return {k: yaml12_numbers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [yaml12_numbers(v) for v in obj]
    if isinstance(obj, str) and _YAML12_FLOAT.match(obj):
        return float(obj)
    return obj


def parse_overrides(items: list[str]) -> dict:
    """Command-line overrides `a.b=value` as a nested dict; values are YAML (`train.steps=50` is
    an int, `optim.grad_clip=null` is None, `model.mlra.targets=[q,k]` a list)."""
    dotted = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"bad override '{item}' (expected key.path=value, e.g. train.steps=50)")
        try:
            dotted[key] = yaml12_numbers(yaml.safe_load(text)) if text else ""
        except yaml.YAMLError:
            raise UserError(f"bad override '{item}': the value is not valid YAML") from None
    return nest(dotted)
