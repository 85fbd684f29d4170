"""Post-step hooks: methods that act on the weights after each `optimizer.step()`.

Each hook takes the model; `methods.Method.post_step` names the hook of a method, and the trainer
runs the hooks of the methods active in the run, in declaration order.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def center_output_embedding(model) -> None:
    """OEC's μ-centering: E <- E - mean_rows(E) over the real vocabulary's rows (padding rows are
    neither counted nor changed); optimizer moments are untouched."""
    E = model.output_embedding()
    E.sub_(E.mean(dim=0, keepdim=True))
