"""Pre-norm GPT (nanoGPT style) with the architecture options of the papers' model families.

The default is GPT-2: LayerNorm, learned positions, GELU MLP, tied embeddings. Options
(METHODS.md §1b, each a `ModelConfig` field): RMSNorm, per-head qk-norm, RoPE on a fraction of
each head's dims, SwiGLU, biases off, untied embeddings, a float32 output layer, the OEC code's
initialization; and the studied methods: MLRA attention (`layers.LowRankHeads`), soft-capping.
Which head rows are output classes: `softmax_rows` and, with `model.mask_unseen_tokens`, the mask
`GPT.softmax_mask` (the training split's never-occurring ids out, set by the trainer).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import LossConfig, ModelConfig, mlra_rank
from .layers import MLP, CausalSelfAttention, LowRankOut, SwiGLU, make_norm, mlp_hidden
from .losses import objective, real_logits


def padded_vocab(vocab_size: int) -> int:
    """Embedding rows: the vocabulary rounded up to a multiple of 64 (fast matmuls)."""
    return 64 * math.ceil(vocab_size / 64)


def softmax_rows(cfg: ModelConfig) -> int:
    """The output-embedding rows the objective and mu see: the real vocabulary, or all padded rows
    with `model.train_padding_rows` (the OEC code's cross-entropy over 50304 GPT-2 rows)."""
    return padded_vocab(cfg.vocab_size) if cfg.train_padding_rows else cfg.vocab_size


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg.norm, cfg.n_embd, cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg.norm, cfg.n_embd, cfg.bias)
        self.mlp = SwiGLU(cfg) if cfg.mlp == "swiglu" else MLP(cfg)

    def forward(self, x: torch.Tensor, logit_max: list[torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), logit_max)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.vocab_size > 0, "model.vocab_size must be set from the token shards"
        self.cfg = cfg
        rows = padded_vocab(cfg.vocab_size)
        self.wte = nn.Embedding(rows, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg.norm, cfg.n_embd, cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, rows, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if cfg.mask_unseen_tokens:
            # the head rows in the softmax and mu: all of softmax_rows until `mask_unseen` sets the
            # training split's; kept in state_dict (model.pt, checkpoints), so a finished run's
            # model is evaluated and sampled with its own mask
            self.register_buffer("vocab_mask", torch.arange(rows) < softmax_rows(cfg))
        self._init_weights()

    # ------------------------------------------------------------------ init

    def _init_weights(self) -> None:
        if self.cfg.init == "oec":
            self._init_oec()
            return
        std = 0.02  # gpt2 (nanoGPT) and llama (Hugging Face's LlamaPreTrainedModel: no residual scaling)
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if self.cfg.init == "gpt2" else std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            nn.init.normal_(block.mlp.c_proj.weight, 0.0, resid_std)
            self._init_attention(block.attn, std, resid_std)

    def _init_oec(self) -> None:
        """The OEC code's init: Xavier-normal linears (the head too; SwiGLU's two gates each as
        its own d x h matrix), the input embedding N(0, 1/d), the attention output projection
        N(0, 0.02 / sqrt(2L)); biases zero."""
        d, resid_std = self.cfg.n_embd, 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            if isinstance(block.mlp, SwiGLU):  # W1 and W3 are one fused matrix here
                nn.init.normal_(block.mlp.c_fc.weight, 0.0, math.sqrt(2.0 / (d + block.mlp.hidden)))
            self._init_attention(block.attn, math.sqrt(2.0 / (d + 3 * d)), resid_std)
        nn.init.normal_(self.wte.weight, 0.0, 1.0 / math.sqrt(d))
        if self.cfg.tie_embeddings:  # the shared matrix keeps the head's (Xavier) init
            nn.init.xavier_normal_(self.lm_head.weight)
        if self.wpe is not None:
            nn.init.normal_(self.wpe.weight, 0.0, 0.02)

    def _init_attention(self, attn: CausalSelfAttention, std: float, resid_std: float) -> None:
        """MLRA's factors (dense projections keep the module loop's init) and the output projection."""
        if attn.low_rank is not None:
            self._init_factors(attn.low_rank.down.weight, attn.low_rank.up, std, attn.low_rank.rank)
        if isinstance(attn.c_proj, LowRankOut):
            self._init_factors(attn.c_proj.down, attn.c_proj.up.weight, resid_std, attn.c_proj.down.shape[-1])
        else:
            nn.init.normal_(attn.c_proj.weight, 0.0, resid_std)

    @staticmethod
    def _init_factors(a: torch.Tensor, b: torch.Tensor, std: float, rank: int) -> None:
        # (choice) both factors get the same std, chosen so that the product A_h B_h has the
        # entry std of the dense layer it replaces: rank * s^4 = std^2.
        s = math.sqrt(std / math.sqrt(rank))
        nn.init.normal_(a, 0.0, s)
        nn.init.normal_(b, 0.0, s)

    # ------------------------------------------------------------------ forward

    def flops_per_token(self) -> int:
        """Training FLOPs per token, 6 N + 12 L H Q T (nanoGPT / PaLM), N the parameters that enter a
        matmul: all but the position embedding and, when untied, the input embedding (a lookup)."""
        c = self.cfg
        n = self.num_params(non_embedding=True) - (0 if c.tie_embeddings else self.wte.weight.numel())
        return 6 * n + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.block_size

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights count once
        return n - self.wpe.weight.numel() if non_embedding and self.wpe is not None else n

    def output_embedding(self) -> torch.Tensor:
        """E (V x d): the output-embedding rows of the real vocabulary, padding excluded (with
        `model.train_padding_rows`, all padded rows: the objective, mu-loss, mu-centering and the
        mu metrics then count them)."""
        return self.lm_head.weight[: softmax_rows(self.cfg)]

    def softmax_mask(self) -> torch.Tensor | None:
        """(V_padded,) bool: the head rows in the softmax, mu, mu-loss, mu-centering and the
        vocabulary metrics, with `model.mask_unseen_tokens`; None without it (then: the first
        `softmax_rows` rows, the default)."""
        return self.vocab_mask if self.cfg.mask_unseen_tokens else None

    def vocab_mask_real(self) -> torch.Tensor | None:
        """`softmax_mask` over the real vocabulary's V columns (for logits and rows [:V]); None: all."""
        mask = self.softmax_mask()
        return None if mask is None else mask[: self.cfg.vocab_size]

    @torch.no_grad()
    def mask_unseen(self, seen: torch.Tensor) -> int:
        """`model.mask_unseen_tokens`: mask the real-vocabulary ids where `seen` (V,) bool is false
        (the padding rows stay as `softmax_rows` has them); returns how many ids are masked."""
        assert self.cfg.mask_unseen_tokens, "model.mask_unseen_tokens is off"
        V = self.cfg.vocab_size
        assert seen.shape == (V,), f"expected ({V},) bools, got {tuple(seen.shape)}"
        self.vocab_mask[:V] = seen.to(self.vocab_mask.device, torch.bool)
        return int(V - seen.sum())

    def hidden(self, idx: torch.Tensor, logit_max: list[torch.Tensor] | None = None) -> torch.Tensor:
        B, T = idx.shape
        assert T <= self.cfg.block_size, f"sequence of {T} tokens exceeds block_size {self.cfg.block_size}"
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, logit_max)
        return self.ln_f(x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Raw head outputs (..., V_padded); in float32 outside autocast when `head_fp32`."""
        if self.cfg.head_fp32:
            with torch.autocast(device_type=h.device.type, enabled=False):
                return nn.functional.linear(h.float(), self.lm_head.weight.float())
        return self.lm_head(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits over the real vocabulary, soft-capped if configured."""
        return real_logits(self.head(h), self.cfg.vocab_size, self.cfg.logit_softcap)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                loss: LossConfig | None = None):
        """Float32 logits (B, T, V); given targets, (objective, cross-entropy) instead, from the
        fused head loss, which never holds the (B, T, V) logits in float32."""
        h = self.hidden(idx)
        if targets is None:
            return self.logits(h)  # (B, T, V)
        return objective(self.head(h), targets, loss or LossConfig(), self.output_embedding(),
                         self.cfg.logit_softcap, self.softmax_mask())

    def metrics_forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The final hidden states (B, T, C), float32 logits (B, T, V) and each layer's attention
        logit max (n_layer,), the max of q.k/sqrt(d_head) over heads and causal pairs (Wortsman et
        al. 2023). Costs an explicit q k^T per layer: for the metrics pass, not for training."""
        maxes: list[torch.Tensor] = []
        h = self.hidden(idx, maxes)
        return h, self.logits(h), torch.stack(maxes)


def seeded_model(cfg: ModelConfig, seed: int, device: torch.device | str = "cpu") -> GPT:
    """A run's initial model: torch seeded with the run's seed, then GPT's init (one seed, one init)."""
    torch.manual_seed(seed)
    return GPT(cfg).to(device)


def attention_params_by_hand(cfg: ModelConfig) -> int:
    """Parameters of one attention layer, counted from the formulas (for reports and tests)."""
    d, H = cfg.n_embd, cfg.n_head
    dh, r = d // H, mlra_rank(cfg)
    low = set(cfg.mlra.targets) if cfg.mlra.enabled else set()
    n = 0
    for t in "qkv":
        n += H * r * (d + dh) if t in low else d * d + (d if cfg.bias else 0)
    n += H * r * (dh + d) if "o" in low else d * d
    n += d if cfg.bias else 0  # output-projection bias
    n += 2 * dh if cfg.qk_norm != "none" else 0  # the q and k gains
    return n


def params_by_hand(cfg: ModelConfig) -> int:
    """All parameters of the model, counted from the formulas (tests check the modules agree)."""
    d, rows = cfg.n_embd, padded_vocab(cfg.vocab_size)
    norm = d + (d if cfg.bias and cfg.norm == "layernorm" else 0)
    h = mlp_hidden(cfg)
    mlp = (d * 2 * h + h * d + (2 * h + d if cfg.bias else 0)) if cfg.mlp == "swiglu" else \
        (d * h + h * d + (h + d if cfg.bias else 0))
    block = 2 * norm + attention_params_by_hand(cfg) + mlp
    embeddings = rows * d * (1 if cfg.tie_embeddings else 2) + (cfg.block_size * d if cfg.position == "learned" else 0)
    return embeddings + cfg.n_layer * block + norm

