"""Post-step hooks: methods that act on the weights after each `optimizer.step()`.

Each hook takes the model; `methods.Method.post_step` names the hook of a method, and the trainer
runs the hooks of the methods active in the run, in declaration order.
"""

from __future__ import annotations

import torch

from ..losses import row_mean


@torch.no_grad()
def center_output_embedding(model) -> None:
    """OEC's μ-centering: E <- E - mean_rows(E) over the real vocabulary's rows (padding rows are
    neither counted nor changed; with `model.mask_unseen_tokens`, the masked rows neither: the mean
    is over the kept rows, and only they are shifted); optimizer moments are untouched."""
    E = model.output_embedding()
    keep = model.softmax_mask()
    if keep is None:
        E.sub_(E.mean(dim=0, keepdim=True))
        return
    k = keep[: E.shape[0], None]
    E.sub_(torch.where(k, row_mean(E, k[:, 0]), 0.0))  # masked rows: x - 0 = x, bit for bit
