"""First-use installation (one confirmation listing everything, torch through PyTorch Utils first)
and the GPU check the modules run before a run."""

from __future__ import annotations

import pytest
from MedTLExtensionLib import dependencies


def fake_spec(missing: set[str]):
    return lambda name: None if name in missing else object()


def test_nothing_missing_installs_nothing_and_asks_nothing():
    calls = []
    installed = dependencies.ensure_dependencies(
        confirm=lambda message: calls.append(message) or True,
        install_torch=lambda: calls.append("torch") or True,
        pip_install=calls.append,
        find_spec=fake_spec(set()),
    )
    assert installed == [] and calls == []


def test_one_confirmation_lists_everything_and_torch_goes_first():
    calls: list = []
    installed = dependencies.ensure_dependencies(
        confirm=lambda message: calls.append(("confirm", message)) or True,
        install_torch=lambda: calls.append(("torch",)) or True,
        pip_install=lambda reqs: calls.append(("pip", list(reqs))),
        find_spec=fake_spec({"torchvision", "monai", "safetensors"}),
    )
    assert [c[0] for c in calls] == ["confirm", "torch", "pip"]
    message = calls[0][1]
    assert "PyTorch" in message and "monai>=1.6" in message and "safetensors>=0.4" in message
    assert calls[2][1] == ["monai>=1.6", "safetensors>=0.4"]
    assert installed[0] == dependencies.TORCH_ITEM


def test_declining_or_no_pytorch_extension_is_a_clear_error():
    with pytest.raises(RuntimeError, match="cannot run without these packages: monai"):
        dependencies.ensure_dependencies(
            confirm=lambda message: False, install_torch=None, pip_install=print, find_spec=fake_spec({"monai"})
        )
    with pytest.raises(RuntimeError, match="Install the 'PyTorch' extension"):
        dependencies.ensure_dependencies(
            confirm=lambda message: True, install_torch=None, pip_install=print, find_spec=fake_spec({"torch"})
        )


def test_testing_mode_never_asks():
    installed = []
    dependencies.ensure_dependencies(
        confirm=lambda message: pytest.fail("a dialog in testing mode"),
        install_torch=lambda: True,
        pip_install=installed.extend,
        testing=True,
        find_spec=fake_spec({"matplotlib"}),
    )
    assert installed == ["matplotlib>=3.7"]


def test_the_gpu_check_asks_the_engine():
    import torch

    report = dependencies.check_device("cuda")
    assert report["requested"] == "cuda" and report["torch"] == torch.__version__
    if not torch.cuda.is_available():
        assert report["device"] == "cpu" and "running on the CPU" in report["warning"]
    assert dependencies.check_device("cpu")["warning"] is None
