"""One device rule for CUDA, Apple's MPS and the CPU, tested with torch's availability functions
replaced (this machine has neither GPU); the real MPS run needs an Apple Silicon machine."""

import os
import subprocess
import sys

import pytest
import torch
from medtl import devices, train
from medtl.config import RunConfig
from medtl.events import EventSink


@pytest.fixture
def machine(monkeypatch):
    """Makes this torch see a GPU of the given kind: "none", "cuda", "cuda_unsupported" or "mps"."""

    def set_to(kind: str) -> None:
        cuda = kind in ("cuda", "cuda_unsupported")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=0: (9, 0))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=0: "Test GPU")
        archs = ["sm_80"] if kind == "cuda_unsupported" else ["sm_80", "sm_90"]
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: archs)
        monkeypatch.setattr(torch.backends.mps, "is_built", lambda: kind == "mps")
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: kind == "mps")

    return set_to


@pytest.mark.parametrize(
    ("kind", "requested", "expected", "warns"),
    [
        ("none", "auto", "cpu", None),
        ("cuda", "auto", "cuda", None),
        ("mps", "auto", "mps", None),
        ("mps", "mps", "mps", None),
        ("mps", "cuda", "cpu", "CUDA requested but no CUDA GPU"),
        ("none", "mps", "cpu", "MPS requested but this torch build has no MPS"),
        ("cuda", "mps", "cpu", "MPS requested"),
        ("cuda_unsupported", "auto", "cpu", "supports sm_80 but the GPU is sm_90"),
        ("mps", "cpu", "cpu", None),
        ("cuda", "cpu", "cpu", None),
    ],
)
def test_one_rule_for_cuda_mps_and_cpu(machine, kind, requested, expected, warns):
    machine(kind)
    report = devices.device_report(requested)
    assert report["device"] == expected
    if warns is None:
        assert report["warning"] is None
    else:
        assert warns in report["warning"] and report["warning"].endswith("running on the CPU")
    seen = []
    assert devices.resolve_device(requested, EventSink(listeners=[seen.append])).type == expected
    assert [e["message"] for e in seen] == ([report["warning"]] if warns else [])


def test_mps_is_explained_and_falls_back_to_the_cpu_per_operator(machine, monkeypatch):
    machine("mps")
    monkeypatch.setenv("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    report = devices.device_report("auto")
    assert report["gpu"] == "Apple GPU (MPS)" and report["mps_fallback"] is True
    assert "run on the CPU" in report["note"]
    monkeypatch.setenv("PYTORCH_ENABLE_MPS_FALLBACK", "0")
    assert "stops the run" in devices.device_report("mps")["note"]


def test_mps_built_but_unavailable_says_what_it_needs(machine, monkeypatch):
    machine("none")
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: True)
    assert "Apple Silicon and macOS 12.3" in devices.device_report("mps")["warning"]


def test_train_keeps_the_same_functions_and_config_accepts_mps():
    assert train.resolve_device is devices.resolve_device and train.device_report is devices.device_report
    assert RunConfig.from_dict({"train": {"device": "mps"}}).train.device == "mps"


def test_the_engine_is_started_with_the_mps_fallback():
    from MedTLExtensionLib.engine_process import engine_environment

    assert engine_environment(base={})["PYTORCH_ENABLE_MPS_FALLBACK"] == "1"
    assert engine_environment(base={"PYTORCH_ENABLE_MPS_FALLBACK": "0"})["PYTORCH_ENABLE_MPS_FALLBACK"] == "0"
    # The command line sets it before anything imports torch (here: a bare interpreter without it).
    probe = (
        "import os, sys; from medtl import cli; cli.main(['models']); "
        "print(os.environ.get('PYTORCH_ENABLE_MPS_FALLBACK'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_ENABLE_MPS_FALLBACK"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env).stdout
    assert out.splitlines()[-1] == "1"
