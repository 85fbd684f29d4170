"""Stability metrics of METHODS.md §3, computed on tensors; the trainer decides when.

All functions return tensors (no host sync); the trainer converts a whole record at once.
`keep` (where taken): a bool mask over the vocabulary (V,), the ids the statistic runs over
(`model.mask_unseen_tokens`: the training split's seen ids); None: all V.
"""

from __future__ import annotations

import torch

from .losses import normalized_logits, row_mean, token_losses


def tev(embedding: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token Embedding Variability: sigma_i = std of row i over its d entries (population std);
    returns (mean_i sigma_i, std_i sigma_i) over the rows (the kept ones)."""
    sigma = embedding.detach().float().std(dim=1, correction=0)
    if keep is not None:
        sigma = sigma[keep[: sigma.shape[0]]]
    return sigma.mean(), sigma.std(correction=0)


def logit_stats(logits: torch.Tensor, keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """OEC's output-logit statistics over positions (B, T, V) (and the kept columns)."""
    logits = logits.detach().float()
    if keep is None:
        return {
            "logits_mean": logits.mean(),
            "logits_absmax": logits.abs().amax(dim=-1).mean(),
            "log_z_sq": torch.logsumexp(logits, dim=-1).square().mean(),
        }
    n = keep.sum() * logits[..., 0].numel()
    return {
        "logits_mean": torch.where(keep, logits, 0.0).sum() / n,
        "logits_absmax": torch.where(keep, logits.abs(), 0.0).amax(dim=-1).mean(),
        "log_z_sq": torch.logsumexp(logits.masked_fill(~keep, float("-inf")), dim=-1).square().mean(),
    }


def mu_norm(embedding: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """||mu||, mu the mean row of an embedding matrix (V x d) (the mean of the kept rows)."""
    return row_mean(embedding.detach().float(), keep).norm()


def hidden_alignment(hidden: torch.Tensor, embedding: torch.Tensor,
                     keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The final hidden states h (..., d) against mu, the mean output-embedding row (V x d). Without
    soft-capping each position's mean logit is h . mu = ||h|| ||mu|| cos(h, mu), so these split
    OEC's drift of the mean logit into its parts: `hidden_norm` (mean ||h||) and `hidden_mu_cos`
    (mean cosine; 0 where mu = 0, noise where mu is rounding noise, as under mu-centering)."""
    h = hidden.detach().float().flatten(0, -2)
    mu = row_mean(embedding.detach().float(), keep)
    norms = h.norm(dim=-1)
    cos = (h @ mu) / (norms * mu.norm()).clamp_min(torch.finfo(torch.float32).tiny)
    return {"hidden_norm": norms.mean(), "hidden_mu_cos": cos.mean()}


def collapse_fractions(logits: torch.Tensor, targets: torch.Tensor, kind: str = "softmax",
                       keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Softmax Collapse (arXiv 2501.04697): the fraction of positions whose
    sum(exp(z - max z)) is exactly 1 (every other class underflows), and the fraction whose
    per-sample loss is exactly 0, in float32 (float64 logits: in float64, the precision such a
    model computes its loss in). z are the logits of the model's own normalizer (over the kept
    columns; a position whose target is masked has an infinite loss, never a zero one)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.detach().to(dtype)
    z = normalized_logits(logits, kind)
    if keep is not None:
        z = z.masked_fill(~keep, float("-inf"))
    denom = torch.exp(z - z.amax(dim=-1, keepdim=True)).sum(dim=-1)
    losses = token_losses(logits, targets, kind, keep)
    return {"collapse_frac": (denom == 1.0).to(dtype).mean(), "zero_loss_frac": (losses == 0.0).to(dtype).mean()}


def grad_groups(model) -> dict[str, list[torch.nn.Parameter]]:
    """A GPT's parameters by part, the groups whose gradient norms are logged: embedding (wte, and
    wpe when learned), block<i>, head (ln_f, and lm_head when untied; a tied head is wte)."""
    wpe = [model.wpe.weight] if model.wpe is not None else []  # none with RoPE
    groups = {"embedding": [model.wte.weight, *wpe]}
    for i, block in enumerate(model.blocks):
        groups[f"block{i}"] = list(block.parameters())
    head = [] if model.cfg.tie_embeddings else [model.lm_head.weight]
    groups["head"] = list(model.ln_f.parameters()) + head
    return groups


def grad_group_norms(groups: dict[str, list[torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    """L2 norm of the gradient of each named parameter group (embedding, block i, head)."""
    out = {}
    for name, params in groups.items():
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            out[f"grad_norm_{name}"] = torch.stack(torch._foreach_norm(grads)).float().norm()
    return out


PARAM_KINDS = ("embedding", "attn", "mlp", "norm", "head")


def param_kind(name: str) -> str:
    """The kind of a GPT parameter by its name: embedding, attn, mlp, norm (every norm gain,
    qk-norm's too) or head (an untied lm_head)."""
    if name.startswith(("wte.", "wpe.")):
        return "embedding"
    if name.startswith("lm_head."):
        return "head"
    if ".q_norm." in name or ".k_norm." in name or name.startswith("ln_f.") or ".ln_" in name:
        return "norm"
    return "attn" if ".attn." in name else "mlp"


def gss_update(abs_sums: list[torch.Tensor], grads: list[torch.Tensor], steps_seen: torch.Tensor,
               threshold: float) -> torch.Tensor:
    """One step of SPAM's gradient spike score, per element: with S the running sum of |g| over
    the steps so far including this one, GSS = |g| / (S / (t + 1)); counts the elements with
    GSS > threshold per tensor (returns a (n_tensors,) tensor) and updates S in place.
    `steps_seen` is t + 1 as a 0-d tensor (no recompilation per step when compiled)."""
    counts = []
    for s, g in zip(abs_sums, grads):
        a = g.detach().abs().float()
        s.add_(a)
        counts.append((a * steps_seen > threshold * s).sum())
    return torch.stack(counts)
