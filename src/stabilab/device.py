"""Device and precision choices shared by the language-model trainer and the grokking study."""

from __future__ import annotations

import contextlib
import re

import torch

from .errors import UserError

PEAK_BF16_TFLOPS = 989.0  # dense bf16 of an H100 / H200 SXM: the benchmarks' MFU denominator


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' (CUDA when available), 'cpu', 'cuda' (this process's local rank) or 'cuda:N'; any
    other name, or a CUDA device this machine lacks, is a UserError (before anything is loaded)."""
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", name):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N (got {name!r})")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but no CUDA device is available")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    device = torch.device(name)
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise UserError(f"--device {name}: this machine has {n} CUDA devices (cuda:0 to cuda:{n - 1})")
    return device


def to_device(device: torch.device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Host batches onto `device`: through pinned memory, without waiting, on CUDA; as they are otherwise."""
    if device.type == "cuda":
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)
    return tensors


def autocast(device: torch.device, dtype: str):
    """bf16 autocast when asked (or 'auto' on CUDA); otherwise no autocast (float32)."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def provenance(device: torch.device | None = None) -> dict:
    """What a result was made with: package and library versions, code version, device."""
    import platform

    from . import __version__
    from .version import code_version

    out = {"stabilab": __version__, **code_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda if torch.cuda.is_available() else None, "python": platform.python_version()}
    if device is not None:
        out["device"] = str(device)
        out["device_name"] = (torch.cuda.get_device_name(device) if device.type == "cuda"
                              else platform.processor() or platform.machine())
    return out
