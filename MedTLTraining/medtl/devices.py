"""Where a run computes: one decision for CUDA, Apple's MPS and the CPU, and the facts behind it.

``auto`` picks CUDA when this torch can run on the NVIDIA GPU, else MPS on Apple Silicon, else the
CPU. On MPS, operators Metal lacks run on the CPU instead of failing
(``PYTORCH_ENABLE_MPS_FALLBACK=1``, set here unless the user chose otherwise; torch reads it when
the MPS backend loads, so the Slicer module and the command line also set it before torch is
imported). Falling back from a GPU that is present but unusable is a visible warning; on a machine
without one, ``auto`` means the CPU and says nothing.

Example:
    >>> device_report("cpu")["device"]
    'cpu'
"""

from __future__ import annotations

import logging
import os
from typing import Any

# Before torch is imported here, for callers that reach this module first.
MPS_FALLBACK_ENV = "PYTORCH_ENABLE_MPS_FALLBACK"
os.environ.setdefault(MPS_FALLBACK_ENV, "1")

import torch  # noqa: E402

from medtl.events import EventSink  # noqa: E402

log = logging.getLogger(__name__)


def resolve_device(name: str, events: EventSink | None = None) -> torch.device:
    """The device a run asked to compute on ``name`` (``auto``, ``cpu``, ``cuda``, ``mps``) uses.

    Args:
        name: the request.
        events: where a fallback warning goes (besides the log).
    """
    report = device_report(name)
    if report["warning"]:
        log.warning(report["warning"])
        if events is not None:
            events.emit("warning", message=report["warning"])
    return torch.device(report["device"])


def cuda_problem() -> str | None:
    """Why this torch cannot use the NVIDIA GPU, or ``None`` when it can."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is available to this torch build"
    major, minor = torch.cuda.get_device_capability(0)
    arch = f"sm_{major}{minor}"
    built = torch.cuda.get_arch_list()
    if built and arch not in built and f"compute_{major}{minor}" not in built:
        return (
            f"this torch build supports {', '.join(built)} but the GPU is {arch}; "
            "install a torch build for this GPU (in Slicer: the PyTorch extension's PyTorchUtils)"
        )
    return None


def mps_problem() -> str | None:
    """Why this torch cannot use Apple's GPU (Metal Performance Shaders), or ``None`` when it can."""
    backend = getattr(torch.backends, "mps", None)
    if backend is None or not backend.is_built():
        return "this torch build has no MPS (Apple GPU) support"
    if not backend.is_available():
        return "MPS is not available here (it needs Apple Silicon and macOS 12.3 or later)"
    return None


def device_report(name: str = "auto") -> dict[str, Any]:
    """Where a run asked to compute on ``name`` would compute, and the GPU facts behind it.

    ``warning`` is the visible message of :func:`resolve_device` (None when there is nothing to
    say); the Slicer modules show it before a run starts. On MPS, ``note`` says what happens to
    operators Metal lacks.
    """
    cuda = None if name in ("cpu", "mps") else cuda_problem()
    mps = None if name in ("cpu", "cuda") else mps_problem()
    if name == "cpu":
        device = "cpu"
    elif name == "cuda":
        device = "cuda" if cuda is None else "cpu"
    elif name == "mps":
        device = "mps" if mps is None else "cpu"
    else:
        device = "cuda" if cuda is None else "mps" if mps is None else "cpu"
    warning = None
    if device == "cpu" and name == "cuda":
        warning = f"CUDA requested but {cuda}; running on the CPU"
    elif device == "cpu" and name == "mps":
        warning = f"MPS requested but {mps}; running on the CPU"
    elif device == "cpu" and name == "auto" and torch.cuda.is_available():
        warning = f"{cuda}; running on the CPU"
    report: dict[str, Any] = {
        "requested": name,
        "device": device,
        "warning": warning,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "built_archs": torch.cuda.get_arch_list() if torch.cuda.is_available() else [],
    }
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        report.update(gpu=torch.cuda.get_device_name(0), capability=f"sm_{major}{minor}")
    if device == "mps":
        fallback = os.environ.get(MPS_FALLBACK_ENV) == "1"
        report.update(
            gpu="Apple GPU (MPS)",
            mps_fallback=fallback,
            note=(
                "operators MPS lacks run on the CPU (PYTORCH_ENABLE_MPS_FALLBACK=1)"
                if fallback
                else "PYTORCH_ENABLE_MPS_FALLBACK is not 1: an operator MPS lacks stops the run"
            ),
        )
    return report
