"""What the engine needs in Slicer's Python, installed on first use after one confirmation, and
whether the GPU can be used, asked of the engine before a run.

torch and torchvision come from the PyTorch extension (its PyTorch Utils module installs the build
that matches the GPU driver); the rest comes from PyPI. Nothing is installed on import: the
modules call :func:`ensure_dependencies` when the user first starts something.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["PIP_REQUIREMENTS", "check_device", "ensure_dependencies", "install_plan"]

# (import name, requirement) of the engine's PyPI dependencies besides torch.
PIP_REQUIREMENTS = (
    ("monai", "monai>=1.6"),
    ("SimpleITK", "SimpleITK>=2.3"),
    ("safetensors", "safetensors>=0.4"),
    ("einops", "einops>=0.7"),
    ("matplotlib", "matplotlib>=3.7"),
    ("jinja2", "jinja2>=3.1"),
    ("scipy", "scipy>=1.15"),
    ("sklearn", "scikit-learn>=1.6"),
    ("fairlearn", "fairlearn>=0.10"),
    ("onnx", "onnx>=1.16"),
    ("onnxruntime", "onnxruntime>=1.18"),
    ("onnxscript", "onnxscript>=0.2"),
)
TORCH_ITEM = "PyTorch and torchvision (through the PyTorch extension's PyTorch Utils)"


def install_plan(find_spec: Callable[[str], Any] = importlib.util.find_spec) -> tuple[bool, list[str]]:
    """(torch or torchvision missing, missing pip requirements), found without importing anything."""
    torch_missing = any(find_spec(name) is None for name in ("torch", "torchvision"))
    return torch_missing, [req for name, req in PIP_REQUIREMENTS if find_spec(name) is None]


def ensure_dependencies(
    *,
    confirm: Callable[[str], bool],
    install_torch: Callable[[], bool] | None,
    pip_install: Callable[[Sequence[str]], None],
    testing: bool = False,
    find_spec: Callable[[str], Any] = importlib.util.find_spec,
) -> list[str]:
    """Installs what is missing after one confirmation that lists all of it; returns what it installed.

    Args:
        confirm: shows the list and returns True to go on (not called in testing mode).
        install_torch: installs torch through PyTorch Utils; None when the PyTorch extension is absent.
        pip_install: installs pip requirements (without a second question).
        testing: Slicer's testing mode: no dialog may block.

    Raises:
        RuntimeError: when torch is missing and the PyTorch extension is not installed, when the
            user declines, or when an installation fails.
    """
    torch_missing, pip_missing = install_plan(find_spec)
    if not torch_missing and not pip_missing:
        return []
    if torch_missing and install_torch is None:
        raise RuntimeError(
            "MedTL needs PyTorch. Install the 'PyTorch' extension from the Extensions Manager and restart"
            " Slicer; MedTL then installs PyTorch through its 'PyTorch Utils' module (or install it there yourself)."
        )
    items = ([TORCH_ITEM] if torch_missing else []) + pip_missing
    message = (
        "MedTL needs these Python packages, which will now be downloaded and installed"
        " (this may take several minutes):\n\n" + "\n".join(f"  - {item}" for item in items)
    )
    if not testing and not confirm(message):
        raise RuntimeError("MedTL cannot run without these packages: " + ", ".join(items))
    # torch first: MONAI's requirements would otherwise pull a generic torch build from PyPI.
    if torch_missing and not install_torch():
        raise RuntimeError("PyTorch was not installed; see PyTorch Utils for details.")
    if pip_missing:
        pip_install(pip_missing)
    importlib.invalidate_caches()
    return items


def slicer_pip_install(requirements: Sequence[str]) -> None:
    """pip-installs with Slicer's own helper, the newest API first (``pip_ensure``, then ``pip_install``)."""
    import slicer.util

    for module_name in ("slicer.packaging", "slicer.pydeps"):
        try:
            pip_ensure = importlib.import_module(module_name).pip_ensure
        except (ImportError, AttributeError):
            continue
        from packaging.requirements import Requirement

        # Already confirmed (or testing): no second dialog, and install even in testing mode.
        pip_ensure(
            [Requirement(r) for r in requirements], prompt_install=False, requester="MedTL", skip_in_testing=False
        )
        return
    slicer.util.pip_install(" ".join(requirements))


def check_device(device: str, python: str | None = None, timeout_s: float = 120.0) -> dict[str, Any]:
    """Asks the engine (``medtl device``, in a child process) where a run on ``device`` would compute.

    The answer's ``warning`` says why not on the GPU (no CUDA, or a torch build without this GPU's
    compute capability, and what to install); ``device`` is where the run will go.
    """
    from MedTLExtensionLib.engine_process import ENGINE_DIR

    path = os.pathsep.join(p for p in (str(ENGINE_DIR), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    command = [python or shutil.which("PythonSlicer") or sys.executable, "-m", "medtl", "device", "--device", device]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"Could not ask the MedTL engine about the GPU: {result.stderr.strip()[-500:]}")
    return json.loads(lines[-1])
