"""A finished run's model as a Hugging Face `transformers` model folder (`save_pretrained`:
config.json, model.safetensors), where a transformers architecture computes exactly its function:

- GPT-2 family (LayerNorm, learned positions, GELU MLP) -> `GPT2LMHeadModel`. GPT-2 always has
  biases: a run without them is exported with zero biases, which computes the same function.
- LLaMA family (RMSNorm, RoPE on every dim of a head, SwiGLU MLP) -> `LlamaForCausalLM`, biases
  as `attention_bias` / `mlp_bias`. Our RoPE rotates adjacent pairs (2i, 2i+1), Llama's
  `rotate_half` the pairs (i, i + d_head/2): the rows of W_q and W_k are permuted per head to
  match (q.k is unchanged by the same permutation of q and k, so are the attention scores).

Tied or untied heads both map (`tie_word_embeddings`). The embedding and head keep only the real
vocabulary's rows (the padding to a multiple of 64 is dropped), so the exported logits are exactly
the run's logits (`GPT.logits`), but for transformers' float32 RoPE angles in Llama (ours are
float64, rounded once: by position 2047 their cos and sin are up to 1.4e-4 apart). Before anything
is written, `check_logits` compares the two models' logits in float64 on random ids over the real
vocabulary, full-length and short sequences. Options with no transformers equivalent are refused
with one line naming the option. Training-only choices (init, losses z-loss and mu-loss,
optimizer, mu-centering, head_fp32) need no mapping. Dropout maps onto GPT-2's three dropouts;
Llama has attention dropout only (dropout is off at inference either way).

The run's tokenizer goes beside the model: a `bpe` or `hf` tokenizer as a `PreTrainedTokenizerFast`,
its end-of-document token (EOT; an `hf` tokenizer's EOS, e.g. T5's </s>) as bos and eos token; for a
`gpt2` (tiktoken) tokenizer a note says which Hugging Face tokenizer has the same ids (nothing is
downloaded here).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from .config import RunConfig
from .errors import UserError
from .inference import load_run, tokenizer_file
from .layers import LN_EPS, RMS_EPS, mlp_hidden, rotary_dims
from .model import GPT
from .tokenizer import load as load_tokenizer
from .train.checkpoint import OUTPUTS

INSTALL = 'pip install -e ".[export]"'  # the extra in pyproject.toml
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
# what each family needs, keyed by model.position (the option that decides the family)
FAMILIES = {"learned": ("gpt2", {"norm": "layernorm", "mlp": "gelu"}),
            "rope": ("llama", {"norm": "rmsnorm", "mlp": "swiglu"})}
# the logit check's tolerance in units of the run's own float32 rounding: transformers' GPT-2 is float64
# throughout in the check, its Llama has a float32 RMSNorm (check_logits)
SLACK = {"gpt2": 1.0, "llama": 4.0}
GPT2_NOTE = """This run used tiktoken's "gpt2" encoding (50257 ids, <|endoftext|> = 50256).
Hugging Face's GPT-2 tokenizer has the same ids: AutoTokenizer.from_pretrained("gpt2")
(or convert the encoding with transformers.integrations.tiktoken.convert_tiktoken_to_fast).
"""


def _refuse(option: str, why: str) -> UserError:
    return UserError(f"cannot export: {option} has no transformers equivalent ({why})")


def family(cfg: RunConfig) -> str:
    """'gpt2' or 'llama': the transformers architecture that computes this run's model; a
    UserError naming the first option that none does."""
    m = cfg.model
    if cfg.loss.kind == "stablemax":
        raise _refuse("loss.kind='stablemax'", "the model's distribution is StableMax of its logits, "
                      "a transformers causal LM's is their softmax")
    if m.mask_unseen_tokens:
        raise _refuse("model.mask_unseen_tokens=true", "the model's distribution leaves out the ids unseen in "
                      "training, a transformers causal LM's softmax covers every id")
    if m.logit_softcap is not None:
        raise _refuse(f"model.logit_softcap={m.logit_softcap:g}", "neither GPT-2 nor Llama soft-caps the logits")
    if m.mlra.enabled:
        raise _refuse("model.mlra.enabled=true", "MLRA's per-head low-rank attention projections")
    if m.qk_norm != "none":
        raise _refuse(f"model.qk_norm={m.qk_norm!r}", "neither GPT-2 nor Llama normalizes q and k")
    name, needs = FAMILIES[m.position]
    for key, value in needs.items():
        if getattr(m, key) != value:
            raise _refuse(f"model.{key}={getattr(m, key)!r} with model.position={m.position!r}",
                          f"{ARCHITECTURES[name]} needs model.{key}={value!r}")
    d_head = m.n_embd // m.n_head
    if name == "llama" and rotary_dims(m) != d_head:
        raise _refuse(f"model.rope_fraction={m.rope_fraction:g}", f"RoPE on {rotary_dims(m)} of {d_head} dims "
                      "of a head; LlamaForCausalLM rotates all of them")
    return name


def hf_config(cfg: RunConfig, name: str, eot_id: int | None):
    """The transformers config of the run's model (real vocabulary, EOT as bos and eos)."""
    from transformers import GPT2Config, LlamaConfig

    m = cfg.model
    common = {"vocab_size": m.vocab_size, "tie_word_embeddings": m.tie_embeddings,
              "bos_token_id": eot_id, "eos_token_id": eot_id}
    if name == "gpt2":  # layers.MLP applies F.gelu, the exact erf GELU: "gelu" ("gelu_new" is the tanh form)
        return GPT2Config(n_positions=m.block_size, n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head,
                          n_inner=mlp_hidden(m), activation_function="gelu", layer_norm_epsilon=LN_EPS,
                          resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout, **common)
    return LlamaConfig(hidden_size=m.n_embd, intermediate_size=mlp_hidden(m), num_hidden_layers=m.n_layer,
                       num_attention_heads=m.n_head, num_key_value_heads=m.n_head, head_dim=m.n_embd // m.n_head,
                       max_position_embeddings=m.block_size, rms_norm_eps=RMS_EPS, rope_theta=m.rope_base,
                       hidden_act="silu", attention_bias=m.bias, mlp_bias=m.bias, attention_dropout=m.dropout,
                       **common)


def _bias(linear: torch.nn.Module) -> torch.Tensor:
    """A module's bias, zeros where it has none (the same function)."""
    return linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.weight.shape[0])


def _conv1d(prefix: str, linear: torch.nn.Linear) -> dict:
    """GPT-2's Conv1D stores the weight as (in, out): nn.Linear's transposed."""
    return {f"{prefix}.weight": linear.weight.T, f"{prefix}.bias": _bias(linear)}


def gpt2_state(model: GPT) -> dict[str, torch.Tensor]:
    V, sd = model.cfg.vocab_size, {}
    for i, b in enumerate(model.blocks):  # attn.dense: q, k, v stacked in that order, as c_attn
        p = f"transformer.h.{i}"
        sd |= {f"{p}.ln_1.weight": b.ln_1.weight, f"{p}.ln_1.bias": _bias(b.ln_1),
               f"{p}.ln_2.weight": b.ln_2.weight, f"{p}.ln_2.bias": _bias(b.ln_2),
               **_conv1d(f"{p}.attn.c_attn", b.attn.dense), **_conv1d(f"{p}.attn.c_proj", b.attn.c_proj),
               **_conv1d(f"{p}.mlp.c_fc", b.mlp.c_fc), **_conv1d(f"{p}.mlp.c_proj", b.mlp.c_proj)}
    return sd | {"transformer.wte.weight": model.wte.weight[:V], "transformer.wpe.weight": model.wpe.weight,
                 "transformer.ln_f.weight": model.ln_f.weight, "transformer.ln_f.bias": _bias(model.ln_f),
                 "lm_head.weight": model.lm_head.weight[:V]}


def _halves(w: torch.Tensor | None, n_head: int) -> torch.Tensor | None:
    """Rows of q or k (weight or bias) per head from RoPE pairs (2i, 2i+1) to pairs (i, i + d_head/2)."""
    if w is None:
        return None
    d_head = w.shape[0] // n_head
    order = torch.cat([torch.arange(0, d_head, 2), torch.arange(1, d_head, 2)])
    return w.view(n_head, d_head, *w.shape[1:])[:, order].reshape(w.shape)


def llama_state(model: GPT) -> dict[str, torch.Tensor]:
    c, sd = model.cfg, {}
    for i, b in enumerate(model.blocks):
        p, attn, mlp = f"model.layers.{i}", b.attn, b.mlp
        q, k, v = attn.dense.weight.split(c.n_embd)  # q, k, v stacked in that order
        qb, kb, vb = attn.dense.bias.split(c.n_embd) if c.bias else (None, None, None)
        gate, up = mlp.c_fc.weight.chunk(2)  # SwiGLU: silu(gate) * up, gate first
        gate_b, up_b = mlp.c_fc.bias.chunk(2) if c.bias else (None, None)
        linears = {"self_attn.q_proj": (_halves(q, c.n_head), _halves(qb, c.n_head)),
                   "self_attn.k_proj": (_halves(k, c.n_head), _halves(kb, c.n_head)),
                   "self_attn.v_proj": (v, vb), "self_attn.o_proj": (attn.c_proj.weight, attn.c_proj.bias),
                   "mlp.gate_proj": (gate, gate_b), "mlp.up_proj": (up, up_b),
                   "mlp.down_proj": (mlp.c_proj.weight, mlp.c_proj.bias)}
        sd |= {f"{p}.input_layernorm.weight": b.ln_1.weight, f"{p}.post_attention_layernorm.weight": b.ln_2.weight}
        for name, (w, bias) in linears.items():
            sd[f"{p}.{name}.weight"] = w
            if bias is not None:
                sd[f"{p}.{name}.bias"] = bias
    return sd | {"model.embed_tokens.weight": model.wte.weight[:c.vocab_size], "model.norm.weight": model.ln_f.weight,
                 "lm_head.weight": model.lm_head.weight[:c.vocab_size]}


def check_ids(vocab: int, block: int) -> list[torch.Tensor]:
    """The logit check's token ids, over the real vocabulary, each batch from its own seed: two
    full-length sequences (every position up to the block size) and two batches of short ones."""
    shapes = [(1, block), (1, block), (4, 1 + block // 7), (8, 1)]  # one sequence a batch: (T, 50257) logits
    return [torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
            for seed, shape in enumerate(shapes)]


def _their_rope(hf, model: GPT) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' RoPE cos and sin (block, d_head / 2; in our pairs' order) after checking that they
    are ours but for its float32 angles (ours: float64, rounded once): within 2^-18 per position (measured:
    under 2^-24 per position, for bases 500 to 500000). A wrong base or head size is off from position 1."""
    rope = next(m for m in hf.modules() if type(m).__name__.endswith("RotaryEmbedding"))
    pos = torch.arange(model.cfg.block_size)
    cos, sin = (t[0, :, : t.shape[-1] // 2].double() for t in rope(torch.zeros(1, dtype=torch.float64), pos[None]))
    ours = model.blocks[0].attn.rotary
    err = torch.maximum((cos - ours.cos).abs(), (sin - ours.sin).abs()).amax(dim=1)
    worst = int((err / (pos + 1)).argmax())
    if err[worst] > (worst + 1) * 2.0**-18:
        import transformers

        raise UserError(f"the exported {ARCHITECTURES['llama']}'s RoPE angles differ from the run's (|cos, sin "
                        f"difference| {float(err[worst]):.3g} at position {worst}, beyond float32 rounding; "
                        f"transformers {transformers.__version__}): nothing written")
    return cos, sin


@torch.no_grad()
def check_logits(model: GPT, hf, name: str) -> tuple[float, float]:
    """(max |logit difference|, its tolerance) of the export `hf` from the run's `model`, both in float64,
    on check_ids; a UserError where a batch's difference is more than SLACK times the run's own float32
    rounding on it (|float32 - float64 logits|) plus 1e-7 of its largest logit.

    In float64 GPT-2 agrees to ~1e-12 of the logits, while a tanh GELU for our exact one moves them by 5
    to 800 times that rounding (measured on random models). transformers computes Llama's RMSNorm and RoPE angles in
    float32 even then: its RMSNorm comes to 0.1-0.8 of that rounding; its angles, at position 2047 enough
    to move logits of sharp attention by 0.07, are checked apart and then given to `model` (changed here)."""
    import transformers

    exact, theirs = copy.deepcopy(model).double(), copy.deepcopy(hf).double()
    exact.cfg = exact.cfg.model_copy(update={"head_fp32": False})  # a float32 head is no reference
    if name == "llama":
        cos, sin = _their_rope(theirs, model)
        for block in (*model.blocks, *exact.blocks):
            block.attn.rotary.cos, block.attn.rotary.sin = cos, sin
    worst = (0.0, 0.0)
    for seed, ids in enumerate(check_ids(model.cfg.vocab_size, model.cfg.block_size)):
        ref = exact(ids)
        diff = float((theirs(ids, use_cache=False).logits.double() - ref).abs().max())
        rounding = float((model(ids).double() - ref).abs().max())
        tol = SLACK[name] * rounding + 1e-7 * max(1.0, float(ref.abs().max()))
        if not diff <= tol:
            raise UserError(f"the exported {ARCHITECTURES[name]} disagrees with the run's model (max |logit "
                            f"difference| {diff:.3g} in float64 on {ids.shape[0]} x {ids.shape[1]} ids of seed "
                            f"{seed}; allowed {tol:.3g}, from the run's own float32 rounding {rounding:.3g}; "
                            f"transformers {transformers.__version__}): nothing written")
        worst = max(worst, (diff, tol))
    return worst


def _save_tokenizer(tok, path: Path, cfg: RunConfig, out: Path) -> str:
    """Write the run's tokenizer (bpe, hf) or the note (gpt2) into `out`; the line that says which."""
    if tok is None:
        return f"no tokenizer exported ({path} not found)"
    if tok.kind == "gpt2":
        (out / "TOKENIZER.txt").write_text(GPT2_NOTE)
        return "tokenizer: tiktoken gpt2, not converted (TOKENIZER.txt says which has the same ids)"
    from transformers import PreTrainedTokenizerFast

    # a bpe run's file is a tokenizers file; an hf run's wraps one (tokenizer.py): its object either way
    source = {"tokenizer_object": tok.impl} if tok.kind == "hf" else {"tokenizer_file": str(path)}
    hf = PreTrainedTokenizerFast(**source, bos_token=tok.eot, eos_token=tok.eot,
                                 clean_up_tokenization_spaces=False)  # decode as ours does
    hf.model_max_length = cfg.model.block_size
    hf.save_pretrained(out)
    return f"tokenizer: {path} ({tok.kind}, {tok.vocab_size} tokens)"


def check_out(run_dir: Path, out: Path) -> None:
    """A UserError unless `out` can take the export: not the run folder (save_pretrained's config.json
    would replace the run's) nor inside it (a run folder holds the run's files only), not another run's
    folder (one with any file a run writes), not a file."""
    if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents:
        raise UserError(f"--out {out} is the run folder or inside it: export into a folder of its own")
    if any((out / name).exists() for name in OUTPUTS):
        raise UserError(f"--out {out} is a run folder: export into a folder of its own")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")


@torch.no_grad()
def export(run_dir: str | Path, out: str | Path) -> list[str]:
    """Write the run's model (float32) and tokenizer as a transformers folder `out`, after checking
    that its logits equal the run's model's (check_logits); the lines that say what was written."""
    run_dir, out = Path(run_dir), Path(out)
    check_out(run_dir, out)
    cfg, model, _ = load_run(run_dir, "cpu")
    name = family(cfg)
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise UserError(f"{run_dir}: model.pt holds NaN or inf weights (a diverged run?): nothing to export")
    try:
        import transformers
    except ImportError:
        raise UserError(f"stabilab export needs transformers: {INSTALL}") from None
    transformers.utils.logging.disable_progress_bar()  # one line per thing written, no bars
    path = Path(tokenizer_file(cfg))
    tok = load_tokenizer(path) if path.exists() else None
    hf = getattr(transformers, ARCHITECTURES[name])(hf_config(cfg, name, tok.eot_id if tok else None))
    hf.float().eval().load_state_dict(gpt2_state(model) if name == "gpt2" else llama_state(model), strict=True)
    diff, tol = check_logits(model, hf, name)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    return [f"model: {ARCHITECTURES[name]}, {cfg.model.n_layer} layers, vocab {cfg.model.vocab_size} (padding "
            f"dropped), max |logit difference| {diff:.2g} in float64 (allowed {tol:.2g}) -> {out}",
            _save_tokenizer(tok, path, cfg, out)]
