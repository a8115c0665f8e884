"""What the engine needs in Slicer's Python, installed when a feature is first used after one
confirmation, and where the engine would compute, asked once per session in the background.

- torch and torchvision come from the PyTorch extension: its PyTorch Utils module installs the
  build that matches the GPU driver, with MedTL's minimum versions as the requirement (an older
  torch is upgraded there too). They go first: a pip install of MONAI would otherwise pull a
  generic torch build from PyPI.
- The rest comes from PyPI, per feature: Learn/Apply/Adapt need a small core; the training panel,
  validation and export add their own packages only when first used. A package that is missing or
  older than MedTL's minimum is installed at the version pinned in the repository's
  ``constraints.txt`` (the versions MedTL is tested with; a test keeps :data:`PINS` equal to it).
- What Slicer bundles (numpy, SimpleITK) and the installed torch are never replaced: pip gets them
  as constraints at their installed versions, and Slicer 5.11+ skips them outright.

Nothing is installed on import, and nothing here imports the packages it checks (versions come from
the installed distributions' metadata), so torch never loads into Slicer's own process for this.

Example:
    >>> plan = install_plan("learn", version_of={"torch": "2.0.1", "torchvision": "0.15.2", "monai": "1.6.1"}.get)
    >>> plan.torch
    'PyTorch 2.0.1 is older than MedTL needs (torch>=2.1)'
    >>> "safetensors==0.8.0" in plan.pip
    True
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

__all__ = [
    "FEATURES",
    "PINS",
    "DeviceCheck",
    "InstallPlan",
    "Package",
    "check_device",
    "ensure_dependencies",
    "install_plan",
]

TORCH = ("torch", ">=2.1")
TORCHVISION = ("torchvision", ">=0.16")
# Shipped with Slicer and linked with its own libraries (VTK's numpy ABI, Slicer's ITK build).
SLICER_BUNDLED = ("numpy", "SimpleITK")
SLICER_BUNDLED_MINIMUM = {"numpy": ">=1.24", "SimpleITK": ">=2.3"}

# The versions of constraints.txt this library installs (Testing/tests/test_dependencies.py checks
# they are the file's).
PINS = {
    "monai": "1.6.1",
    "safetensors": "0.8.0",
    "einops": "0.8.2",
    "scipy": "1.17.1",
    "scikit-learn": "1.9.1",
    "fairlearn": "0.15.0",
    "onnx": "1.23.2",
    "onnxruntime": "1.31.1",
    "onnxscript": "0.7.2",
    "Jinja2": "3.1.6",
    "matplotlib": "3.11.2",
    "cryptography": "50.0.2",
}


@dataclass(frozen=True)
class Package:
    """A PyPI distribution the engine imports.

    Attributes:
        distribution: its name on PyPI (and in ``importlib.metadata``).
        minimum: the versions the engine works with (from pyproject.toml).
        why: what needs it, for the confirmation.
    """

    distribution: str
    minimum: str
    why: str

    def requirement(self) -> str:
        """What to install: the tested pin, else the minimum."""
        pin = PINS.get(self.distribution)
        return f"{self.distribution}=={pin}" if pin else f"{self.distribution}{self.minimum}"

    def satisfied_by(self, version: str | None) -> bool:
        return _satisfies(version, self.minimum)


# What each feature runs in the engine needs besides torch. Measured by running the feature with
# the other packages made unimportable (Testing/tests/test_dependencies.py does it for "learn").
_CORE = (
    Package("monai", ">=1.6", "networks, transforms, losses, metrics"),
    Package("safetensors", ">=0.4", "model packages"),
    Package("scipy", ">=1.15", "statistics of the run report"),
    Package("scikit-learn", ">=1.6", "the drift reference stored with a model"),
    Package("matplotlib", ">=3.7", "the run's plots"),
    Package("Jinja2", ">=3.1", "the run's report.html"),
    Package("cryptography", ">=42", "checking the signature of a signed model package"),
)
_FAIRNESS = Package("fairlearn", ">=0.10", "per-group fairness metrics")
FEATURES: dict[str, tuple[Package, ...]] = {
    "learn": _CORE,  # Learn from my slices, Apply model, Adapt
    "train": (*_CORE, Package("einops", ">=0.7", "the SwinUNETR network"), _FAIRNESS),
    "validate": (*_CORE, _FAIRNESS),
    "export": (
        *_CORE,
        Package("onnx", ">=1.16", "ONNX export"),
        Package("onnxruntime", ">=1.18", "the exported model's check"),
        Package("onnxscript", ">=0.2", "torch's ONNX exporter"),
    ),
}
TORCH_ITEM = "PyTorch and torchvision (through the PyTorch extension's PyTorch Utils)"


def _satisfies(version: str | None, specifier: str) -> bool:
    if version is None:
        return False
    try:
        return SpecifierSet(specifier).contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, read from its metadata (nothing is imported)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class InstallPlan:
    """What a feature still needs.

    Attributes:
        torch: why PyTorch Utils must install torch (missing or too old), or None.
        pip: pinned requirements to pip-install.
        keep: ``name==version`` of what must not change (Slicer's bundled packages, the installed
            torch): constraints for pip.
        problems: bundled packages too old for MedTL (never replaced; the user needs another Slicer).
    """

    torch: str | None = None
    pip: list[str] = field(default_factory=list)
    keep: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def items(self) -> list[str]:
        return ([TORCH_ITEM] if self.torch else []) + self.pip


def install_plan(feature: str = "learn", *, version_of: Callable[[str], str | None] = installed_version) -> InstallPlan:
    """What ``feature`` needs that is missing or too old, found from the installed versions alone.

    Args:
        feature: one of :data:`FEATURES`.
        version_of: distribution name -> installed version or None (tests inject one).
    """
    if feature not in FEATURES:
        raise ValueError(f"unknown feature '{feature}' (known: {', '.join(FEATURES)})")
    plan = InstallPlan()
    torch_version, vision_version = version_of(TORCH[0]), version_of(TORCHVISION[0])
    if torch_version is None or vision_version is None:
        plan.torch = "PyTorch is not installed" if torch_version is None else "torchvision is not installed"
    elif not _satisfies(torch_version, TORCH[1]):
        plan.torch = f"PyTorch {torch_version} is older than MedTL needs (torch{TORCH[1]})"
    elif not _satisfies(vision_version, TORCHVISION[1]):
        plan.torch = f"torchvision {vision_version} is older than MedTL needs (torchvision{TORCHVISION[1]})"
    else:
        plan.keep += [f"torch=={torch_version}", f"torchvision=={vision_version}"]
    for name in SLICER_BUNDLED:
        version = version_of(name)
        if version is None:
            continue
        plan.keep.append(f"{name}=={version}")
        if not _satisfies(version, SLICER_BUNDLED_MINIMUM[name]):
            plan.problems.append(f"{name} {version} (MedTL needs {name}{SLICER_BUNDLED_MINIMUM[name]})")
    plan.pip = [p.requirement() for p in FEATURES[feature] if not p.satisfied_by(version_of(p.distribution))]
    return plan


@dataclass
class InstallResult:
    """What :func:`ensure_dependencies` did."""

    installed: list[str] = field(default_factory=list)
    restart_needed: bool = False  # a package that was already imported in this process was replaced


def ensure_dependencies(
    feature: str = "learn",
    *,
    confirm: Callable[[str], bool],
    install_torch: Callable[[str, str], bool] | None,
    pip_install: Callable[[Sequence[str], Sequence[str]], None],
    testing: bool = False,
    version_of: Callable[[str], str | None] = installed_version,
    loaded: Callable[[str], bool] = lambda name: name in sys.modules,
) -> InstallResult:
    """Installs what ``feature`` lacks after one confirmation that lists all of it.

    Args:
        feature: what the user is about to run (:data:`FEATURES`).
        confirm: shows the list and returns True to go on (not called in testing mode).
        install_torch: installs torch through PyTorch Utils given the torch and torchvision version
            requirements (``">=2.1"``); None when the PyTorch extension is absent.
        pip_install: installs the requirements with the given ``name==version`` constraints.
        testing: Slicer's testing mode: no dialog may block.
        version_of: distribution name -> installed version (tests inject one).
        loaded: whether an import name is already loaded in this process (then a restart is needed).

    Raises:
        RuntimeError: torch missing or too old without the PyTorch extension, a bundled package too
            old, the user declining, or a failed installation.
    """
    plan = install_plan(feature, version_of=version_of)
    if plan.problems:
        raise RuntimeError(
            "This Slicer's own Python packages are too old for MedTL: " + "; ".join(plan.problems) + ". MedTL does not"
            " replace what Slicer ships; install a newer Slicer."
        )
    result = InstallResult()
    if not plan.items:
        return result
    if plan.torch and install_torch is None:
        raise RuntimeError(
            f"MedTL needs PyTorch ({plan.torch}). Install the 'PyTorch' extension from the Extensions Manager and"
            " restart Slicer; MedTL then installs PyTorch through its 'PyTorch Utils' module (or install it there"
            f" yourself with the version requirement torch{TORCH[1]})."
        )
    message = (
        "MedTL needs these Python packages, which will now be downloaded and installed"
        " (this may take several minutes):\n\n" + "\n".join(f"  - {item}" for item in plan.items)
    )
    if plan.torch:
        message += f"\n\n({plan.torch}.)"
    if not testing and not confirm(message):
        raise RuntimeError("MedTL cannot run without these packages: " + ", ".join(plan.items))
    if plan.torch:
        was_loaded = loaded("torch")
        if not install_torch(TORCH[1], TORCHVISION[1]):
            raise RuntimeError("PyTorch was not installed; see PyTorch Utils for details.")
        result.restart_needed = was_loaded
        # The torch just installed must not be replaced by what the pip packages ask for.
        plan.keep += [f"{name}=={v}" for name in (TORCH[0], TORCHVISION[0]) if (v := version_of(name))]
    if plan.pip:
        replaced = [r.split("==")[0] for r in plan.pip if version_of(r.split("==")[0]) is not None]
        pip_install(plan.pip, plan.keep)
        result.restart_needed = result.restart_needed or any(loaded(_import_name(name)) for name in replaced)
    importlib.invalidate_caches()
    result.installed = plan.items
    return result


def _import_name(distribution: str) -> str:
    return {"scikit-learn": "sklearn", "Jinja2": "jinja2"}.get(distribution, distribution)


def slicer_pip_install(requirements: Sequence[str], keep: Sequence[str]) -> None:
    """pip-installs with Slicer's own helper, keeping ``keep`` (``name==version``) as they are.

    Slicer 5.11+ (``slicer.pydeps.pip_ensure``): the kept packages are skipped outright and given as
    constraints; older Slicer: ``pip install -c`` with them.
    """
    import slicer.util

    with tempfile.TemporaryDirectory(prefix="medtl-pip-") as folder:
        constraints = os.path.join(folder, "constraints.txt")
        with open(constraints, "w", encoding="utf-8") as f:
            f.write("\n".join(keep) + "\n")
        with contextlib.suppress(ImportError, AttributeError):
            pip_ensure = importlib.import_module("slicer.pydeps").pip_ensure
            from packaging.requirements import Requirement

            # Already confirmed (or testing): no second dialog, and install even in testing mode.
            pip_ensure(
                [Requirement(r) for r in requirements],
                constraints=constraints,
                skip_packages=[k.split("==")[0] for k in keep],
                prompt_install=False,
                requester="MedTL",
                skip_in_testing=False,
            )
            return
        slicer.util.pip_install([*requirements, "-c", constraints])


def check_device(device: str, python: str | None = None, timeout_s: float = 120.0) -> dict[str, Any]:
    """Asks the engine (``medtl device``, in a child process started as Slicer starts its tools)
    where a run on ``device`` would compute.

    The answer's ``warning`` says why not on the GPU (no CUDA, or a torch build without this GPU's
    compute capability, and what to install); ``device`` is where the run will go.
    """
    from MedTLExtensionLib.engine_process import engine_environment, popen_options, slicer_startup_environment

    launcher = None if python else shutil.which("PythonSlicer")
    env = engine_environment(base=slicer_startup_environment() if launcher else None)
    command = [python or launcher or sys.executable, "-m", "medtl", "device", "--device", device]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        stdin=subprocess.DEVNULL,
        **popen_options(),
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"Could not ask the MedTL engine about the GPU: {result.stderr.strip()[-500:]}")
    return json.loads(lines[-1])


class DeviceCheck:
    """The engine's device answer, asked once per session per device, on a background thread.

    Starting the engine to ask costs seconds (it imports torch); the modules start the check when
    they open and read the cached answer when a run starts, never waiting for it.

    Args:
        ask: the question (default :func:`check_device`).
    """

    def __init__(self, ask: Callable[[str], dict[str, Any]] = check_device) -> None:
        self._ask = ask
        self._lock = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}
        self._answers: dict[str, dict[str, Any]] = {}

    def start(self, device: str = "auto") -> None:
        """Asks in the background unless already asked."""
        with self._lock:
            if device in self._threads:
                return
            thread = threading.Thread(target=self._run, args=(device,), daemon=True, name=f"medtl-device-{device}")
            self._threads[device] = thread
        thread.start()

    def _run(self, device: str) -> None:
        try:
            answer = self._ask(device)
        except Exception:  # noqa: BLE001 - e.g. torch not installed yet: ask again next time
            with self._lock:
                del self._threads[device]
            return
        with self._lock:
            self._answers[device] = answer

    def report(self, device: str = "auto") -> dict[str, Any] | None:
        """The answer, or None while it is being asked (the check is started if it was not)."""
        self.start(device)
        with self._lock:
            return self._answers.get(device)

    def wait(self, device: str = "auto", timeout_s: float | None = None) -> dict[str, Any] | None:
        """The answer, waiting up to ``timeout_s`` for it (scripts and tests)."""
        self.start(device)
        with self._lock:
            thread = self._threads.get(device)
        if thread is not None:
            thread.join(timeout_s)
        with self._lock:
            return self._answers.get(device)


DEVICE_CHECK = DeviceCheck()
