"""Train N runs of one shape at once, stacked on a leading member dimension (issue 14).

A small model leaves a GPU launch-bound: every kernel does little work. N runs that differ only
in their peak learning rate and seed can share every kernel launch instead: their parameters
are stacked into tensors of shape (N, ...), and the pipeline's own `GPT` runs over them under
`torch.vmap` (`torch.func.functional_call` on a weightless template), so each matmul of a layer
becomes one batched matmul for all N members. Nothing of the model is rewritten: init, forward,
head and loss are the single-run code's.

Each member's trajectory is that of the same run trained alone by `Trainer.train_step` (tests/
test_stacked.py checks it in float64 to ~1e-10 per step):
- init: `seeded_model`, the Trainer's, with the member's seed;
- data: the member's own batches, `shards.train_batch(tokens, seed, step, micro, ...)` (the batch
  order depends on the seed), stacked to (N, B, T);
- loss: `losses.objective` per member on its slice of the stacked head outputs (the fused head
  loss under compile; z-loss, mu-loss and soft-capping included; with `model.mask_unseen_tokens`
  the members' one mask, the shared training split's seen ids, as `Trainer` sets it);
- schedule: `optim.lr_at` with the member's optimizer config;
- clipping: `clip_grad_norm_`'s formula over each member's slice (its own global norm);
- AdamW: PyTorch's update in PyTorch's order, decoupled (or independent) weight decay on the
  parameters `optim.param_groups` decays, with the member's weight decay.

A member whose loss or gradient norm is non-finite is *frozen*: the update of that step and of
every later step is dropped (its parameters and moments keep their values), it is reported by
`diverged_step`, and the other members are unaffected (their slices never mix with it).

Supported (each in tests/test_stacked.py): AdamW with clipping on or off, decoupled or independent
weight decay, z-loss, mu-loss, soft-capping, the float32 head, model.mask_unseen_tokens, and the
architecture options of the GPT-2 and OEC families (tied or not, LayerNorm or RMSNorm, qk-norm,
RoPE, SwiGLU, MLRA), gradient accumulation. Refused (one-line UserError): SPAM, perpGrad,
StableMax, post-step hooks (mu-centering), dropout, spike scores, several processes, init_from,
and members differing in anything but lr and seed.

It trains and reports per-member losses and grad norms; `stacked_runs.StackedRuns` (`stabilab
train-stacked`, `bench_grid.py --stacked N`) turns its members into pipeline runs with their own
run folders.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn
from torch.func import functional_call, stack_module_state
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config import RunConfig, RuntimeConfig, leaves
from ..device import autocast, pick_device, to_device
from ..errors import UserError
from ..losses import objective
from ..methods import post_step_hooks
from ..metrics import grad_groups
from ..model import GPT, seeded_model, softmax_rows
from ..optim import lr_at, param_groups
from ..shards import open_shards, token_counts, train_batch

# CPU attention has no vmap batching rule (a loop over members: correct, slow); CUDA's flash,
# memory-efficient and cuDNN attention have one.
warnings.filterwarnings("ignore", message=".*batching rule for aten::_scaled_dot_product_flash_attention_for_cpu")
# cuDNN attention is left out on CUDA: compiled under vmap it failed on the H200 (torch 2.11: inductor's
# output check raised "expected Tensor() for op: aten._scaled_dot_product_cudnn_attention" at N = 8);
# flash and memory-efficient attention have vmap batching rules. Not yet re-measured on a GPU.
STACKED_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

PER_MEMBER = {"optim.lr", "seed"}  # what members may differ in


def check_members(cfgs: list[RunConfig]) -> None:
    """Refuse members or options the stacked path does not train exactly as `Trainer` does."""
    if not cfgs:
        raise UserError("stacked training needs at least one member")
    first = leaves(cfgs[0].to_dict())
    for cfg in cfgs[1:]:
        for key, value in leaves(cfg.to_dict()).items():
            if key not in PER_MEMBER and value != first[key]:
                raise UserError(f"stacked members must differ only in optim.lr and seed: '{key}' is "
                                f"{first[key]!r} and {value!r}")
    cfg = cfgs[0]
    refused = {
        "optim.name=spam (SPAM)": cfg.optim.name != "adamw",
        "optim.perpgrad (perpGrad)": cfg.optim.perpgrad,
        "loss.kind=stablemax (StableMax)": cfg.loss.kind != "softmax",
        "post-step hooks (mu-centering)": bool(post_step_hooks(cfg)),
        "model.dropout > 0": cfg.model.dropout > 0,
        "train.spike_scores": cfg.train.spike_scores,
        "train.processes > 1": cfg.train.processes > 1,
        "train.init_from": bool(cfg.train.init_from),
    }
    bad = [name for name, on in refused.items() if on]
    if bad:
        raise UserError(f"stacked training does not support {bad[0]}: train these runs one by one")


class _Body(nn.Module):
    """GPT.hidden then GPT.head: raw head outputs (B, T, V_padded), the part vmapped over members."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.gpt.head(self.gpt.hidden(idx))


def clip_and_adamw_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                    exp_avg_sqs: list[torch.Tensor], decayed: list[bool], decay: torch.Tensor,
                    step_size: torch.Tensor, bc2_sqrt: torch.Tensor, alive: torch.Tensor, clip: float,
                    beta1: float, beta2: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-member grad-norm clipping and one AdamW step on stacked tensors (N, ...), in place.

    `decay` (N,) is 1 - lr_t wd per member, `step_size` (N,) is -lr_t / (1 - beta1^t) (PyTorch's
    signs and order), `bc2_sqrt` sqrt(1 - beta2^t) (0-d), `alive` (N,) bool. Members with a
    non-finite gradient norm, or not alive, keep their parameters and moments (`torch.where`, so
    one member's NaN never reaches another's slice). Returns (grad norm (N,), updated (N,) bool)."""
    N = alive.shape[0]
    # clip_grad_norm_ per member: the norm of the per-tensor norms, coef = clip / (norm + 1e-6) <= 1
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(N, -1), dim=1) for g in grads], dim=1)  # (N, tensors)
    total = torch.linalg.vector_norm(norms, dim=1)  # (N,)
    coef = (clip / (total + 1e-6)).clamp(max=1.0)
    ok = alive & torch.isfinite(total)
    for p, g, m, v, dec in zip(params, grads, exp_avgs, exp_avg_sqs, decayed):
        shape = (N,) + (1,) * (p.dim() - 1)  # broadcasts a per-member value over the member's slice
        keep = ok.view(shape)
        g = g * coef.view(shape)
        new_p = p * decay.view(shape) if dec else p
        new_m = m.lerp(g, 1.0 - beta1)
        new_v = (v * beta2).addcmul(g, g, value=1.0 - beta2)
        denom = new_v.sqrt() / bc2_sqrt + eps
        new_p = new_p + step_size.view(shape) * (new_m / denom)
        p.copy_(torch.where(keep, new_p, p))
        m.copy_(torch.where(keep, new_m, m))
        v.copy_(torch.where(keep, new_v, v))
    return total, ok


class StackedTrainer:
    """N members (same shape and options, own peak LR and seed) trained in one process."""

    def __init__(self, cfgs: list[RunConfig], runtime: RuntimeConfig | None = None):
        check_members(cfgs)
        self.runtime = runtime or RuntimeConfig()
        self.device = pick_device(self.runtime.device)
        self.compiled = self.runtime.compiles_on(self.device)
        d = cfgs[0].data
        self.meta, data = open_shards(d.shards, d.tokenizer, d.vocab_size, d.tokenizer_file or None)
        self.train_tokens = data["train"]
        self.cfgs = [c.with_vocab(self.meta["tokenizer"]["vocab_size"]) for c in cfgs]
        self.n = len(self.cfgs)
        cfg = self.cfgs[0]
        members = [_Body(seeded_model(c.model, c.seed, self.device)) for c in self.cfgs]
        if cfg.model.mask_unseen_tokens:  # one split, one mask: in the buffers every member shares
            members[0].gpt.mask_unseen(torch.from_numpy(token_counts(self.train_tokens, cfg.model.vocab_size) > 0))
        params, _ = stack_module_state(members)  # name -> (N, ...) leaf tensors; tied weights once
        self.params: dict[str, torch.Tensor] = params
        self.buffers = {k: b for k, b in members[0].named_buffers()}  # RoPE tables: the same for all
        with torch.device("meta"):  # the weightless module functional_call runs with the stacked ones
            self.template = GPT(cfg.model)
        self.body = _Body(self.template)
        names = {id(p): name for name, p in self.body.named_parameters()}
        self.head_name = names[id(self.template.lm_head.weight)]  # 'gpt.wte.weight' when tied
        # stacked name -> the Trainer's gradient-norm group (embedding, block<i>, head)
        self.group_of = {names[id(p)]: group for group, ps in grad_groups(self.template).items() for p in ps}
        groups = [param_groups(self.template, c.optim) for c in self.cfgs]
        decayed_ids = {id(p) for p in groups[0][0]["params"]}
        self.names = list(self.params)
        self.decayed = [id(dict(self.body.named_parameters())[k]) in decayed_ids for k in self.names]
        self.weight_decay = [g[0]["weight_decay"] for g in groups]  # per member (independent WD: wd / lr)
        self.exp_avgs = [torch.zeros_like(self.params[k]) for k in self.names]
        self.exp_avg_sqs = [torch.zeros_like(self.params[k]) for k in self.names]
        self.alive = torch.ones(self.n, dtype=torch.bool, device=self.device)
        self.first_dropped = torch.zeros(self.n, dtype=torch.long, device=self.device)  # 0: none yet
        self.step = 0
        self.lrs = [0.0] * self.n
        self.loss_fn = torch.compile(self._losses) if self.compiled else self._losses
        self.update = torch.compile(clip_and_adamw_, dynamic=False) if self.compiled else clip_and_adamw_

    # ------------------------------------------------------------------ data

    def batch(self, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's own batch of this step and micro-batch, stacked: x, y (N, B, T)."""
        t, T = self.cfgs[0].train, self.cfgs[0].model.block_size
        pairs = [train_batch(self.train_tokens, c.seed, self.step, micro, t.batch_size, T) for c in self.cfgs]
        return to_device(self.device, torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))

    # ------------------------------------------------------------------ steps

    def attention_backends(self):
        """The SDPA backends the stacked step may use (STACKED_SDPA on CUDA; torch's choice elsewhere);
        entered around tracing and running alike, since the compiled graph fixes the kernel it traced."""
        return sdpa_kernel(STACKED_SDPA) if self.device.type == "cuda" else contextlib.nullcontext()

    def _losses(self, params: dict[str, torch.Tensor], x: torch.Tensor,
                y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective, cross-entropy) per member, both (N,), from stacked x, y (N, B, T)."""
        cfg = self.cfgs[0]

        def body(p, idx):
            return functional_call(self.body, (p, self.buffers), (idx,))

        raw = torch.vmap(body)(params, x)  # (N, B, T, V_padded): one batched launch per layer
        E = params[self.head_name][:, : softmax_rows(cfg.model)]  # (N, V, d) output embeddings
        keep = self.buffers.get("gpt.vocab_mask")  # model.mask_unseen_tokens (None: off)
        pairs = [objective(raw[i], y[i], cfg.loss, E[i], cfg.model.logit_softcap, keep) for i in range(self.n)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def train_step(self, measure: bool = False) -> dict[str, torch.Tensor]:
        """One optimizer step of every member. Returns device tensors (N,): ce_sum (the micro-batches'
        cross-entropies summed, as `Trainer`'s running loss adds them; NaN for a member frozen before
        this step, as a single run's NaN weights would give), train_loss (their mean), grad_norm
        (before clipping), updated (bool); with `measure` also grad_norm_<group> after clipping, as
        `Trainer.train_step` measures them."""
        t = self.cfgs[0].train
        self.lrs = [lr_at(self.step, c.optim, t.steps) for c in self.cfgs]
        was_alive = self.alive.clone()
        ce_sum = torch.zeros(self.n, device=self.device)
        finite = torch.ones(self.n, dtype=torch.bool, device=self.device)
        for micro in range(t.grad_accum):
            x, y = self.batch(micro)
            with autocast(self.device, t.dtype), self.attention_backends():
                losses, ces = self.loss_fn(self.params, x, y)
                # the sum's gradient on member i's slice is that of member i's own loss alone
                (losses.sum() / t.grad_accum).backward()
            ce_sum += ces.detach()
            finite &= torch.isfinite(losses.detach())
        self.alive &= finite
        groups = self._group_norms() if measure else {}
        grad_norm, updated = self._optimizer_step()
        if groups:  # clip_grad_norm_'s coefficient per member, as the single run measures after clipping
            clip = self.cfgs[0].optim.grad_clip
            coef = (clip / (grad_norm + 1e-6)).clamp(max=1.0) if clip is not None else torch.ones_like(grad_norm)
            groups = {k: v * coef for k, v in groups.items()}
        for k in self.names:
            self.params[k].grad = None
        self.step += 1
        # a member frozen before this step reports what the run alone, whose weights went NaN, would
        nan = lambda v: torch.where(was_alive, v, torch.full_like(v, float("nan")))  # noqa: E731
        ce_sum = nan(ce_sum)
        return {"ce_sum": ce_sum, "train_loss": ce_sum / t.grad_accum, "grad_norm": nan(grad_norm),
                "updated": updated, **{k: nan(v) for k, v in groups.items()}}

    @torch.no_grad()
    def _group_norms(self) -> dict[str, torch.Tensor]:
        """Per member, the L2 norm of each parameter group's gradient (N,), before clipping."""
        sq: dict[str, torch.Tensor] = {}
        for k in self.names:
            g = self.params[k].grad
            if g is not None:
                norm = torch.linalg.vector_norm(g.reshape(self.n, -1).float(), dim=1)
                key = f"grad_norm_{self.group_of[k]}"
                sq[key] = sq.get(key, 0) + norm**2
        return {k: v.sqrt() for k, v in sq.items()}

    @torch.no_grad()
    def _optimizer_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.cfgs[0].optim
        beta1, beta2 = o.betas
        n = self.step + 1  # AdamW's step count
        bc1, bc2 = 1 - beta1**n, 1 - beta2**n
        dtype = self.params[self.names[0]].dtype
        member = lambda values: torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)
        decay = member([1 - lr * wd for lr, wd in zip(self.lrs, self.weight_decay)])
        step_size = member([(lr / bc1) * -1 for lr in self.lrs])
        clip = o.grad_clip if o.grad_clip is not None else float("inf")
        grads = [self.params[k].grad for k in self.names]
        grad_norm, updated = self.update([self.params[k] for k in self.names], grads, self.exp_avgs,
                                         self.exp_avg_sqs, self.decayed, decay, step_size, member(bc2**0.5),
                                         self.alive, clip, beta1, beta2, o.eps)
        self.alive &= updated
        self.first_dropped = torch.where(~updated & (self.first_dropped == 0), n, self.first_dropped)
        return grad_norm, updated

    @property
    def diverged_step(self) -> list[int | None]:
        """Per member, the step (from 1) whose update was the first dropped; None: never (a host sync)."""
        return [s if s > 0 else None for s in self.first_dropped.tolist()]

    # ------------------------------------------------------------------ members

    def member_state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Member i's weights as a `GPT.state_dict()` (tied weights under both names): views of the
        stacked tensors, which the next step changes (clone to keep)."""
        prefix = "gpt."
        state = {k.removeprefix(prefix): v[i].detach() for k, v in self.params.items()}
        if self.cfgs[0].model.tie_embeddings:
            state["lm_head.weight"] = state["wte.weight"]
        if "gpt.vocab_mask" in self.buffers:  # model.mask_unseen_tokens: the one persistent buffer
            state["vocab_mask"] = self.buffers["gpt.vocab_mask"]
        return state

    def flops_per_token(self) -> int:
        """One member's training FLOPs per token (`GPT.flops_per_token`)."""
        return self.template.flops_per_token()

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one step of all members together."""
        t = self.cfgs[0].train
        return self.n * t.batch_size * t.grad_accum * self.cfgs[0].model.block_size
