"""First-use installation: per feature, one confirmation listing everything, torch through PyTorch
Utils with MedTL's minimum versions (first), pins from constraints.txt, Slicer's bundled packages
never replaced; and the device check, asked once per session in the background."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import tomllib
from MedTLExtensionLib import dependencies
from MedTLExtensionLib.dependencies import FEATURES, PINS, DeviceCheck, ensure_dependencies, install_plan

REPO = Path(__file__).resolve().parents[2]
CURRENT = {
    "torch": "2.14.1",
    "torchvision": "0.29.1",
    "numpy": "2.4.6",
    "SimpleITK": "2.5.7",
    **{p.distribution: PINS[p.distribution] for packages in FEATURES.values() for p in packages},
}


class Site:
    """Installed distributions of a fake Slicer Python; installing changes them."""

    def __init__(self, **versions: str | None) -> None:
        self.versions = {**CURRENT, **versions}
        self.calls: list[tuple] = []

    def version_of(self, name: str) -> str | None:
        return self.versions.get(name)

    def confirm(self, message: str) -> bool:
        self.calls.append(("confirm", message))
        return True

    def install_torch(self, torch_requirement: str, vision_requirement: str) -> bool:
        self.calls.append(("torch", torch_requirement, vision_requirement))
        self.versions.update(torch="2.5.1+cu121", torchvision="0.20.1+cu121")
        return True

    def pip_install(self, requirements, keep) -> None:
        self.calls.append(("pip", list(requirements), list(keep)))
        for requirement in requirements:
            name, _, version = requirement.partition("==")
            self.versions[name] = version

    def ensure(self, feature: str = "learn", **kwargs):
        options = dict(
            confirm=self.confirm,
            install_torch=self.install_torch,
            pip_install=self.pip_install,
            version_of=self.version_of,
            loaded=lambda name: False,
        )
        return ensure_dependencies(feature, **{**options, **kwargs})


def test_nothing_missing_installs_nothing_and_asks_nothing():
    site = Site()
    for feature in FEATURES:
        assert site.ensure(feature).installed == []
    assert site.calls == []


def test_an_old_torch_goes_to_pytorch_utils_with_the_requirement_first():
    site = Site(torch="2.0.1", monai=None)
    result = site.ensure()
    assert [c[0] for c in site.calls] == ["confirm", "torch", "pip"]
    assert "PyTorch 2.0.1 is older than MedTL needs (torch>=2.1)" in site.calls[0][1]
    assert site.calls[1] == ("torch", ">=2.1", ">=0.16")
    _, requirements, keep = site.calls[2]
    assert requirements == ["monai==1.6.1"]
    # The torch PyTorch Utils just installed and Slicer's own packages are pinned where they are.
    assert {"torch==2.5.1+cu121", "torchvision==0.20.1+cu121", "numpy==2.4.6", "SimpleITK==2.5.7"} <= set(keep)
    assert result.installed == [dependencies.TORCH_ITEM, "monai==1.6.1"] and not result.restart_needed


def test_without_the_pytorch_extension_the_message_says_what_to_install():
    with pytest.raises(RuntimeError, match=r"PyTorch is not installed.*'PyTorch' extension"):
        Site(torch=None).ensure(install_torch=None)
    with pytest.raises(RuntimeError, match=r"torch>=2\.1"):
        Site(torch="1.13.1").ensure(install_torch=None)


def test_learn_installs_only_its_core_and_extras_wait_for_their_feature():
    missing = {name: None for name in ("monai", "safetensors", "fairlearn", "onnx", "onnxruntime", "einops")}
    site = Site(**missing)
    site.ensure("learn")
    assert site.calls[-1][1] == ["monai==1.6.1", "safetensors==0.8.0"]
    assert site.version_of("fairlearn") is None and site.version_of("onnx") is None

    site.ensure("export")
    assert site.calls[-1][1] == ["onnx==1.23.2", "onnxruntime==1.31.1"]
    assert site.version_of("fairlearn") is None, "export does not need fairlearn"
    site.ensure("validate")
    assert site.calls[-1][1] == ["fairlearn==0.15.0"]
    assert install_plan("train", version_of=site.version_of).pip == ["einops==0.8.2"]


def test_a_package_older_than_the_minimum_gets_the_pinned_version_a_newer_one_stays():
    site = Site(monai="1.5.0", **{"scikit-learn": "1.99.0"})
    site.ensure()
    assert site.calls[-1][1] == ["monai==1.6.1"]
    assert site.version_of("scikit-learn") == "1.99.0"


def test_slicer_bundled_packages_are_never_installed_or_replaced():
    plan = install_plan("learn", version_of=Site(numpy=None).version_of)
    assert not any(r.startswith(("numpy", "SimpleITK")) for r in plan.pip)
    site = Site(SimpleITK="2.1.0", monai=None)
    with pytest.raises(RuntimeError, match=r"SimpleITK 2\.1\.0 .*does not\s+replace what Slicer ships"):
        site.ensure()
    assert site.calls == []


def test_declining_is_a_clear_error_and_testing_mode_never_asks():
    with pytest.raises(RuntimeError, match="cannot run without these packages: monai==1.6.1"):
        Site(monai=None).ensure(confirm=lambda message: False)
    site = Site(matplotlib=None)
    site.ensure(confirm=lambda message: pytest.fail("a dialog in testing mode"), testing=True)
    assert site.calls == [("pip", ["matplotlib==3.11.2"], site.calls[0][2])]


def test_replacing_a_loaded_package_asks_for_a_restart():
    result = Site(torch="2.0.1").ensure(loaded=lambda name: name == "torch")
    assert result.restart_needed
    result = Site(monai="1.5.0").ensure(loaded=lambda name: name == "monai")
    assert result.restart_needed
    assert not Site(monai=None).ensure(loaded=lambda name: name == "numpy").restart_needed


def test_pins_are_constraints_txt_and_minimums_are_pyprojects():
    constraints = dict(
        line.split("==")
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert PINS == {name: constraints[name] for name in PINS}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    ranges = {r.split(">=")[0].split()[0].lower(): ">=" + r.split(">=")[1].split()[0] for r in project}
    for packages in FEATURES.values():
        for package in packages:
            assert ranges[package.distribution.lower()] == package.minimum, package.distribution
            assert package.distribution in PINS
    assert ranges["torch"] == dependencies.TORCH[1] and ranges["torchvision"] == dependencies.TORCHVISION[1]


def test_slicer_pip_install_keeps_what_it_must(monkeypatch):
    """Slicer before 5.11 (no slicer.pydeps): pip install with the kept versions as constraints."""
    import slicer.util

    seen = {}

    def pip_install(args):
        constraints = args[args.index("-c") + 1]
        seen.update(args=list(args), constraints=Path(constraints).read_text())

    monkeypatch.setattr(slicer.util, "pip_install", pip_install, raising=False)
    monkeypatch.setitem(sys.modules, "slicer.pydeps", None)
    dependencies.slicer_pip_install(["monai==1.6.1"], ["torch==2.5.1", "numpy==2.4.6"])
    assert seen["args"][0] == "monai==1.6.1" and seen["constraints"].split() == ["torch==2.5.1", "numpy==2.4.6"]


def test_learn_apply_adapt_run_without_the_extras(tmp_path, synthetic_dataset):
    """The "learn" core is enough: the engine trains, predicts and adapts with every other package
    unimportable (as if not installed)."""
    extras = sorted(
        {p.distribution for f in FEATURES.values() for p in f} - {p.distribution for p in FEATURES["learn"]}
    )
    import_names = [{"scikit-learn": "sklearn"}.get(name, name) for name in extras] + ["onnx", "onnxruntime"]
    script = textwrap.dedent(
        f"""
        import sys
        for name in {sorted(set(import_names))!r}:
            sys.modules[name] = None  # import fails, find_spec says absent
        from medtl import cli
        sys.exit(cli.main(sys.argv[1:]))
        """
    )
    import json

    from conftest import tiny_config

    cfg = tiny_config(
        synthetic_dataset,
        tmp_path / "run",
        model={"name": "unet_mobilenet_v2", "pretrained": "none"},
        train={"epochs": 1, "steps_per_epoch": 2},
    )
    config = tmp_path / "run.json"
    config.write_text(json.dumps(cfg))
    image = str(synthetic_dataset.parent / "case0.nrrd")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def medtl(*args: str) -> None:
        done = subprocess.run([sys.executable, "-c", script, *args, "--quiet"], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-2000:]

    medtl("train", str(config), "--predict", image, "--predict-out", str(tmp_path / "seg.nrrd"))
    medtl("adapt", "--model", str(tmp_path / "run" / "model"), "--image", image, "--out", str(tmp_path / "adapted"))
    medtl(
        "predict",
        "--model",
        str(tmp_path / "adapted"),
        "--image",
        image,
        "--out",
        str(tmp_path / "seg2.nrrd"),
        "--probabilities",
        str(tmp_path / "p.nrrd"),
    )
    assert (tmp_path / "seg.nrrd").is_file() and (tmp_path / "seg2.nrrd").is_file()
    assert "einops" in extras and "fairlearn" in extras and "onnxruntime" in extras


def test_the_device_check_runs_once_in_the_background():
    asked = []
    release = threading.Event()

    def slow_engine(device):
        asked.append(device)
        release.wait(10)
        return {"requested": device, "device": "cpu", "warning": "no CUDA GPU"}

    check = DeviceCheck(slow_engine)
    started = time.monotonic()
    assert check.report("auto") is None  # asking, not waiting
    assert time.monotonic() - started < 0.1
    check.start("auto")
    release.set()
    assert check.wait("auto", 10)["device"] == "cpu"
    assert check.report("auto")["warning"] == "no CUDA GPU"
    assert asked == ["auto"], "asked once per session"


def test_a_failed_device_check_is_asked_again_later():
    answers = iter([RuntimeError("torch is not installed yet"), {"device": "cpu", "warning": None}])

    def engine(device):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    check = DeviceCheck(engine)
    assert check.wait("auto", 10) is None
    assert check.wait("auto", 10) == {"device": "cpu", "warning": None}


def test_the_gpu_check_asks_the_engine():
    import torch

    report = dependencies.check_device("cuda")
    assert report["requested"] == "cuda" and report["torch"] == torch.__version__
    if not torch.cuda.is_available():
        assert report["device"] == "cpu" and "running on the CPU" in report["warning"]
    assert dependencies.check_device("cpu")["warning"] is None
