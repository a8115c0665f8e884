"""Signed packages: an edit to the manifest (or weights with their new hash) is refused; an
unsigned package says so; a signature by another key is told apart (issue 20)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from medtl.any_package import load_package
from medtl.errors import WeightsError
from medtl.signing import SIGNATURE, verify_package
from test_bad_input import cli, fingerprint


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    from conftest import tiny_config
    from medtl.config import RunConfig
    from medtl.models.registry import build_model
    from medtl.package import save_package

    folder = tmp_path_factory.mktemp("signed")
    cfg = RunConfig.from_dict(
        tiny_config("x.csv", folder / "run", model={"name": "unet_resnet18", "pretrained": "none"})
    )
    return save_package(folder / "model", build_model("unet_resnet18", num_classes=3), cfg)


@pytest.fixture
def package(built, tmp_path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "pkg"))


@pytest.fixture
def key(tmp_path, capsys) -> Path:
    code, lines = cli(capsys, "keygen", "--out", str(tmp_path / "keys" / "me.pem"))
    assert code == 0, lines
    return tmp_path / "keys" / "me.pem"


def test_sign_then_verify_and_load(package, key, capsys):
    assert (key.stat().st_mode & 0o777) == 0o600, "the private key is its owner's only"
    before = fingerprint(package)
    assert load_package(package).signature == "unsigned"
    assert cli(capsys, "sign", "--model", str(package), "--key", str(key))[0] == 0
    added = set(fingerprint(package)) - set(before)
    assert added == {SIGNATURE} and all(fingerprint(package)[k] == v for k, v in before.items())
    capsys.readouterr()
    from medtl.cli import main

    assert main(["verify", "--model", str(package), "--public-key", f"{key}.pub"]) == 0
    out = capsys.readouterr().out
    assert "files match the manifest; signature valid (key " in out
    assert load_package(package).signature.startswith("signature valid (key ")
    assert main(["info", str(package)]) == 0 and "signature:     signature valid" in capsys.readouterr().out


def edit_label(package: Path) -> None:
    manifest = json.loads((package / "medtl_package.json").read_text())
    manifest["labels"][1]["name"] = "spleen"
    (package / "medtl_package.json").write_text(json.dumps(manifest, indent=2) + "\n")


def replace_weights(package: Path) -> None:
    """What an attacker does: other weights, and their new hash in the manifest."""
    from medtl.data.io import sha256_file

    weights = package / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    manifest = json.loads((package / "medtl_package.json").read_text())
    manifest["files"]["model.safetensors"] = sha256_file(weights)
    (package / "medtl_package.json").write_text(json.dumps(manifest, indent=2) + "\n")


@pytest.mark.parametrize("tamper", [edit_label, replace_weights])
def test_an_edit_after_signing_is_refused(package, key, capsys, tamper):
    assert cli(capsys, "sign", "--model", str(package), "--key", str(key))[0] == 0
    tamper(package)
    code, lines = cli(capsys, "verify", "--model", str(package))
    assert code == 2 and len(lines) == 1
    assert "the signature does not match medtl_package.json: the package was changed after signing" in lines[0]
    with pytest.raises(WeightsError, match="changed after signing"):
        load_package(package)
    code, lines = cli(capsys, "predict", "--model", str(package), "--image", "x.nrrd", "--out", "y.nrrd")
    assert code == 2 and "changed after signing" in lines[0]
    # Nor does training start from it (model.pretrained may name a package).
    from medtl.models.weights import read_state_dict

    with pytest.raises(WeightsError, match="changed after signing"):
        read_state_dict(package)


def test_without_a_signature_hashes_alone_cannot_tell(package, capsys):
    """What the hashes do not protect against: the same edits to an unsigned package load."""
    replace_weights(package)
    assert load_package(package).signature == "unsigned"
    code, lines = cli(capsys, "verify", "--model", str(package), "--public-key", "none.pub")
    assert code == 2 and "unsigned, but --public-key asks for a signature" in lines[0]


def test_a_signature_by_another_key_is_told_apart(package, key, tmp_path, capsys):
    other = tmp_path / "other.pem"
    assert cli(capsys, "keygen", "--out", str(other))[0] == 0
    edit_label(package)
    assert cli(capsys, "sign", "--model", str(package), "--key", str(other))[0] == 0
    assert verify_package(package).startswith("signature valid")  # valid, but by someone else's key
    code, lines = cli(capsys, "verify", "--model", str(package), "--public-key", f"{key}.pub")
    assert code == 2 and "not by the given --public-key" in lines[0]
    code, lines = cli(capsys, "keygen", "--out", str(other))
    assert code == 2 and "exists already; a key is never overwritten" in lines[0]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command on this machine")
def test_openssl_keys_work(package, tmp_path, capsys):
    key, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-out", str(pub)], check=True)
    assert cli(capsys, "sign", "--model", str(package), "--key", str(key))[0] == 0
    assert verify_package(package, pub).startswith("signature valid")
