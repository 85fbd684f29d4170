"""Pre-LN GPT-2 (nanoGPT style) with the architectural variants of the studies.

- MLRA (arXiv 2409.07787): per-head low-rank attention projections W_h = A_h B_h.
- Logit soft-capping (Gemma 2): l <- c * tanh(l / c).
- Tied or untied input/output embeddings.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LossConfig, ModelConfig
from .losses import objective, real_logits


def padded_vocab(vocab_size: int) -> int:
    """Embedding rows: the vocabulary rounded up to a multiple of 64 (fast matmuls)."""
    return 64 * math.ceil(vocab_size / 64)


def mlra_rank(cfg: ModelConfig) -> int:
    d_head = cfg.n_embd // cfg.n_head
    return cfg.mlra.rank if cfg.mlra.rank is not None else d_head // 2


class LowRankHeads(nn.Module):
    """Input projection with one rank-r factorization per head: x A_h B_h, A_h: d x r, B_h: r x d_head.

    `n_proj` projections (e.g. q, k, v) share one fused matmul for A.
    """

    def __init__(self, d_in: int, n_proj: int, n_head: int, rank: int, d_head: int):
        super().__init__()
        self.n_proj, self.n_head, self.rank = n_proj, n_head, rank
        self.down = nn.Linear(d_in, n_proj * n_head * rank, bias=False)  # all A_h side by side
        self.up = nn.Parameter(torch.empty(n_proj, n_head, rank, d_head))  # all B_h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        z = self.down(x).view(B, T, self.n_proj, self.n_head, self.rank)  # (B, T, P, H, r)
        return torch.einsum("btphr,phrd->btphd", z, self.up)  # (B, T, P, H, d_head)


class LowRankOut(nn.Module):
    """Output projection factorized per head: y_h C_h D_h, C_h: d_head x r, D_h: r x d."""

    def __init__(self, n_head: int, d_head: int, rank: int, d_out: int, bias: bool):
        super().__init__()
        self.n_head, self.d_head = n_head, d_head
        self.down = nn.Parameter(torch.empty(n_head, d_head, rank))  # all C_h
        self.up = nn.Linear(n_head * rank, d_out, bias=bias)  # all D_h stacked

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        B, T, _ = y.shape
        z = torch.einsum("bthd,hdr->bthr", y.view(B, T, self.n_head, self.d_head), self.down)
        return self.up(z.reshape(B, T, -1))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_embd = cfg.n_head, cfg.n_embd
        self.d_head = cfg.n_embd // cfg.n_head
        self.dropout = cfg.dropout
        low_rank = set(cfg.mlra.targets) if cfg.mlra.enabled else set()
        rank = mlra_rank(cfg)
        self.dense_targets = [t for t in "qkv" if t not in low_rank]
        self.low_rank_targets = [t for t in "qkv" if t in low_rank]
        self.dense = (nn.Linear(cfg.n_embd, len(self.dense_targets) * cfg.n_embd, bias=cfg.bias)
                      if self.dense_targets else None)
        self.low_rank = (LowRankHeads(cfg.n_embd, len(self.low_rank_targets), cfg.n_head, rank, self.d_head)
                         if self.low_rank_targets else None)
        self.c_proj = (LowRankOut(cfg.n_head, self.d_head, rank, cfg.n_embd, cfg.bias) if "o" in low_rank
                       else nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias))
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def qkv(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        B, T, C = x.shape
        heads = {}
        if self.dense is not None:
            for t, part in zip(self.dense_targets, self.dense(x).split(C, dim=2)):
                heads[t] = part.view(B, T, self.n_head, self.d_head)
        if self.low_rank is not None:
            for t, part in zip(self.low_rank_targets, self.low_rank(x).unbind(2)):
                heads[t] = part
        return {t: h.transpose(1, 2) for t, h in heads.items()}  # (B, H, T, d_head)

    def forward(self, x: torch.Tensor, logit_max: list[torch.Tensor] | None = None) -> torch.Tensor:
        """`logit_max`, if given, gets this layer's attention logit max appended (metrics pass)."""
        B, T, C = x.shape
        h = self.qkv(x)
        q, k, v = h["q"], h["k"], h["v"]
        if logit_max is not None:
            logit_max.append(attention_logit_max(q, k))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

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
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, rows, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self._init_weights()

    def _init_weights(self) -> None:
        std, resid_std = 0.02, 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            nn.init.normal_(block.mlp.c_proj.weight, 0.0, resid_std)
            attn = block.attn
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

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights count once
        return n - self.wpe.weight.numel() if non_embedding else n

    def output_embedding(self) -> torch.Tensor:
        """E (V x d): the output-embedding rows of the real vocabulary, padding excluded."""
        return self.lm_head.weight[: self.cfg.vocab_size]

    def hidden(self, idx: torch.Tensor, logit_max: list[torch.Tensor] | None = None) -> torch.Tensor:
        B, T = idx.shape
        assert T <= self.cfg.block_size, f"sequence of {T} tokens exceeds block_size {self.cfg.block_size}"
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x, logit_max)
        return self.ln_f(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits over the real vocabulary, soft-capped if configured."""
        return real_logits(self.lm_head(h), self.cfg.vocab_size, self.cfg.logit_softcap)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                loss: LossConfig | None = None):
        """Float32 logits (B, T, V); given targets, (objective, cross-entropy) instead, from the
        fused head loss, which never holds the (B, T, V) logits in float32."""
        h = self.hidden(idx)
        if targets is None:
            return self.logits(h)  # (B, T, V)
        return objective(self.lm_head(h), targets, loss or LossConfig(), self.output_embedding(),
                         self.cfg.logit_softcap)

    def logits_and_attention_max(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 logits (B, T, V) and each layer's attention logit max (n_layer,), the max of
        q.k/sqrt(d_head) over heads and causal pairs (Wortsman et al. 2023). Costs an explicit
        q k^T per layer: for the metrics pass, not for training."""
        maxes: list[torch.Tensor] = []
        logits = self.logits(self.hidden(idx, maxes))
        return logits, torch.stack(maxes)


_BMM_HAS_OUT_DTYPE = "dtype" in torch.ops.aten.bmm.overloads()  # torch.bmm(..., out_dtype=) (newer torch)


def attention_logit_max(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """max of q_i.k_j / sqrt(d_head) over batch, heads and causal pairs j <= i; q, k (B, H, T, d_head).

    The scores are float32 (float64 stays float64). For bfloat16/float16 q, k on a GPU they come
    from one matmul with float32 output: the products of 16-bit numbers are exact in float32, so
    this equals the float32 matmul of the upcast q, k, at the 16-bit matmul's speed."""
    B, H, T, D = q.shape
    q2, k2 = q.reshape(B * H, T, D), k.reshape(B * H, T, D)
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and _BMM_HAS_OUT_DTYPE:
        scores = torch.bmm(q2, k2.transpose(1, 2), out_dtype=torch.float32)
    else:
        dtype = torch.promote_types(q.dtype, torch.float32)
        scores = torch.bmm(q2.to(dtype), k2.to(dtype).transpose(1, 2))  # (B H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~causal, float("-inf")).amax() / math.sqrt(D)


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
    return n
