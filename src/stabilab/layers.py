"""The building blocks of the model: norms, rotary position embedding, attention (dense or
MLRA low-rank, optional qk-norm), and the GELU or SwiGLU MLP.

Each option is a small module chosen by a `ModelConfig` field (METHODS.md §1b).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig, mlra_rank

RMS_EPS = 1e-6  # (choice) LLaMA's RMSNorm epsilon
LN_EPS = 1e-5  # LayerNorm's: PyTorch's default, as GPT-2's


def make_norm(kind: str, dim: int, bias: bool) -> nn.Module:
    """LayerNorm (bias if `bias`) or RMSNorm (never a bias), both with a learnable gain."""
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=RMS_EPS)
    return nn.LayerNorm(dim, eps=LN_EPS, bias=bias)


def mlp_hidden(cfg: ModelConfig) -> int:
    """The MLP width: `mlp_hidden` if set, else 4d for GELU and, for SwiGLU, 8d/3 rounded up to a
    multiple of 256 (the OEC and LLaMA rule: about the parameters and FLOPs of a 4d GELU MLP)."""
    if cfg.mlp_hidden is not None:
        return cfg.mlp_hidden
    if cfg.mlp == "swiglu":
        return 256 * math.ceil(int(8 * cfg.n_embd / 3) / 256)
    return 4 * cfg.n_embd


def rotary_dims(cfg: ModelConfig) -> int:
    """How many of each head's dims RoPE rotates: the largest even number <= rope_fraction * d_head."""
    return 2 * int(cfg.rope_fraction * (cfg.n_embd // cfg.n_head) / 2)


class Rotary(nn.Module):
    """RoPE on the first `dims` dims of each head, in adjacent pairs (2i, 2i+1) rotated by
    pos * base^(-2i / dims) (the convention of the rotary-embedding library the OEC code uses).
    The remaining dims pass through unrotated. Rotation is done in float32 (float64 stays float64)."""

    def __init__(self, dims: int, block_size: int, base: float):
        super().__init__()
        self.dims = dims
        inv_freq = base ** (-torch.arange(0, dims, 2, dtype=torch.float64) / dims)  # (dims/2,)
        angles = torch.arange(block_size, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (T, dims/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, T, d_head) -> the same with the first `dims` dims rotated."""
        T, dtype = x.shape[-2], torch.promote_types(x.dtype, torch.float32)
        rot, rest = x[..., : self.dims], x[..., self.dims:]
        a, b = rot.to(dtype).unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, T, dims/2) each
        cos, sin = self.cos[:T].to(dtype), self.sin[:T].to(dtype)
        rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)
        return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated


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
        # qk-norm: one gain over d_head for q and one for k, shared by the heads; never a bias, so
        # that |q.k| / sqrt(d_head) <= max|g_q| max|g_k| sqrt(d_head)
        self.q_norm = make_norm(cfg.qk_norm, self.d_head, bias=False) if cfg.qk_norm != "none" else None
        self.k_norm = make_norm(cfg.qk_norm, self.d_head, bias=False) if cfg.qk_norm != "none" else None
        self.rotary = (Rotary(rotary_dims(cfg), cfg.block_size, cfg.rope_base)
                       if cfg.position == "rope" and rotary_dims(cfg) > 0 else None)

    def qkv(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The heads of q, k, v (B, H, T, d_head), q and k normalized and rotated as configured."""
        B, T, C = x.shape
        heads = {}
        if self.dense is not None:
            for t, part in zip(self.dense_targets, self.dense(x).split(C, dim=2)):
                heads[t] = part.view(B, T, self.n_head, self.d_head)
        if self.low_rank is not None:
            for t, part in zip(self.low_rank_targets, self.low_rank(x).unbind(2)):
                heads[t] = part
        heads = {t: h.transpose(1, 2) for t, h in heads.items()}
        if self.q_norm is not None:
            heads["q"], heads["k"] = self.q_norm(heads["q"]), self.k_norm(heads["k"])
        if self.rotary is not None:
            heads["q"], heads["k"] = self.rotary(heads["q"]), self.rotary(heads["k"])
        return heads

    def forward(self, x: torch.Tensor, logit_max: list[torch.Tensor] | None = None) -> torch.Tensor:
        """`logit_max`, if given, gets this layer's attention logit max appended (metrics pass)."""
        B, T, C = x.shape
        h = self.qkv(x)
        q, k, v = h["q"], h["k"], h["v"]
        if logit_max is not None:
            logit_max.append(attention_logit_max(q, k))
        # qk-norm and RoPE leave q, k in float32 under autocast while v is bf16; autocast casts them
        # to v's dtype inside SDPA, but not under torch.vmap (the stacked runs), so cast them here
        q, k = q.to(v.dtype), k.to(v.dtype)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GPT-2's MLP: c_proj(gelu(c_fc x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, mlp_hidden(cfg), bias=cfg.bias)
        self.c_proj = nn.Linear(mlp_hidden(cfg), cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class SwiGLU(nn.Module):
    """LLaMA's MLP: c_proj(silu(W1 x) * W3 x); W1 and W3 share one matmul (c_fc, 2h outputs)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hidden = mlp_hidden(cfg)
        self.c_fc = nn.Linear(cfg.n_embd, 2 * self.hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(self.hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.dropout(self.c_proj(F.silu(gate) * up))


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
