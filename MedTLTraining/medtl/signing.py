"""Ed25519 signatures of model packages: tamper evidence for the manifest, and so for every file.

The manifest (``medtl_package.json``) lists every package file with its sha256, and loading checks
them; but whoever can edit a file can edit its hash too. A signature over the manifest's exact
bytes, made with a private key only its owner holds, detects any edit after signing: a changed
preset, a renamed label, replaced weights with their new hash. It is kept beside the manifest
(``medtl_package.sig``, a detached signature), so signing changes no file.

    medtl keygen --out medtl_key.pem          # private key (0600) and medtl_key.pem.pub
    medtl sign --model PKG --key medtl_key.pem
    medtl verify --model PKG --public-key medtl_key.pem.pub

OpenSSL makes the same keys: ``openssl genpkey -algorithm ed25519 -out medtl_key.pem`` and
``openssl pkey -in medtl_key.pem -pubout -out medtl_key.pem.pub``.

A signature names its public key. Without ``--public-key`` a valid signature shows only that the
package is unchanged since *someone* signed it (the key's fingerprint says who, if you know it);
with the owner's public key it shows the owner signed exactly this package.

Torch-free; ``cryptography`` is imported only to sign or to check a package that has a signature.

Example:
    >>> import tempfile, pathlib, json
    >>> pkg = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (pkg / "medtl_package.json").write_text(json.dumps({"files": {}}))
    >>> private, public = generate_key_pair()
    >>> sign_package(pkg, private)["algorithm"], verify_package(pkg, public).startswith("signature valid")
    ('ed25519', True)
    >>> _ = (pkg / "medtl_package.json").write_text(json.dumps({"files": {"x": "0"}}))
    >>> verify_package(pkg)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    medtl.errors.WeightsError: ... the signature does not match medtl_package.json: the package was changed ...
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from medtl.errors import DataError, WeightsError

MANIFEST = "medtl_package.json"
SIGNATURE = "medtl_package.sig"
UNSIGNED = "unsigned"


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise WeightsError("signatures need the 'cryptography' package (pip install cryptography)") from None
    return serialization, ed25519


def fingerprint(public_raw: bytes) -> str:
    """A short name for a public key: the first 16 hex digits of its sha256."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def generate_key_pair() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as PEM: (private PKCS#8, public SubjectPublicKeyInfo)."""
    serialization, ed25519 = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def write_key_pair(path: str | Path) -> tuple[Path, Path]:
    """``path`` (the private key, readable by its owner only) and ``path.pub``; an existing key is
    never replaced."""
    path = Path(path)
    public_path = path.with_name(path.name + ".pub")
    for existing in (path, public_path):
        if existing.exists():
            raise DataError(f"{existing}: exists already; a key is never overwritten")
    private, public = generate_key_pair()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private)
    public_path.write_bytes(public)
    return path, public_path


def _read(path_or_pem: str | Path | bytes, what: str) -> bytes:
    if isinstance(path_or_pem, bytes):
        return path_or_pem
    try:
        return Path(path_or_pem).read_bytes()
    except OSError as err:
        raise DataError(f"{what} {path_or_pem}: {err.strerror}") from None


def _private_key(key: str | Path | bytes):
    serialization, ed25519 = _crypto()
    try:
        loaded = serialization.load_pem_private_key(_read(key, "--key"), password=None)
    except (ValueError, TypeError) as err:
        raise DataError(
            f"--key {key if not isinstance(key, bytes) else ''}: not an unencrypted PEM private key ({err})"
        ) from None
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise DataError("--key: not an Ed25519 key (openssl genpkey -algorithm ed25519)")
    return loaded


def _public_raw(key: str | Path | bytes) -> bytes:
    serialization, ed25519 = _crypto()
    try:
        loaded = serialization.load_pem_public_key(_read(key, "--public-key"))
    except (ValueError, TypeError) as err:
        raise DataError(f"--public-key: not a PEM public key ({err})") from None
    if not isinstance(loaded, ed25519.Ed25519PublicKey):
        raise DataError("--public-key: not an Ed25519 public key")
    return loaded.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _manifest_bytes(package: Path) -> bytes:
    try:
        return (package / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{package}: not a MedTL model package (no {MANIFEST})") from None


def sign_package(package: str | Path, key: str | Path | bytes) -> dict[str, Any]:
    """Signs the package's manifest with ``key`` (PEM private key or its path); writes and
    returns the detached signature record. The package's files are checked against the manifest
    first: signing a damaged package would vouch for it."""
    package = Path(package)
    check_files(package)
    serialization, _ = _crypto()
    private = _private_key(key)
    manifest = _manifest_bytes(package)
    public_raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    record = {
        "algorithm": "ed25519",
        "signed_file": MANIFEST,
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "public_key": base64.b64encode(public_raw).decode(),
        "key_fingerprint": fingerprint(public_raw),
        "signature": base64.b64encode(private.sign(manifest)).decode(),
    }
    from medtl.data.io import atomic_write_text

    atomic_write_text(package / SIGNATURE, json.dumps(record, indent=2) + "\n")
    return record


def check_files(package: Path) -> None:
    """Every file the manifest lists is there with its sha256."""
    from medtl.data.io import sha256_file

    manifest = json.loads(_manifest_bytes(package).decode("utf-8"))
    for name, expected in manifest.get("files", {}).items():
        file = package / name
        if not file.is_file():
            raise WeightsError(f"{package}: package file missing: {name}")
        if sha256_file(file) != expected:
            raise WeightsError(f"{file}: sha256 does not match the package manifest; refusing to load it")


def verify_package(package: str | Path, public_key: str | Path | bytes | None = None) -> str:
    """``"unsigned"``, or ``"signature valid (key <fingerprint>)"``; a signature that does not
    match the manifest (or is not by ``public_key``, when given) raises :class:`WeightsError`.

    Only the manifest is checked here; its files' hashes are checked by whoever loads them.
    """
    package = Path(package)
    sig_path = package / SIGNATURE
    if not sig_path.is_file():
        if public_key is not None:
            raise WeightsError(f"{package}: unsigned, but --public-key asks for a signature by that key")
        return UNSIGNED
    try:
        record = json.loads(sig_path.read_text(encoding="utf-8"))
        public_raw = base64.b64decode(record["public_key"], validate=True)
        signature = base64.b64decode(record["signature"], validate=True)
    except (ValueError, KeyError, TypeError) as err:
        raise WeightsError(f"{sig_path}: damaged signature file ({err}); refusing to load the package") from None
    if record.get("algorithm") != "ed25519":
        raise WeightsError(f"{sig_path}: unknown signature algorithm {record.get('algorithm')!r}")
    if public_key is not None and public_raw != _public_raw(public_key):
        raise WeightsError(
            f"{package}: signed by key {fingerprint(public_raw)}, not by the given --public-key "
            f"({fingerprint(_public_raw(public_key))}); refusing to load it"
        )
    _, ed25519 = _crypto()
    from cryptography.exceptions import InvalidSignature

    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, _manifest_bytes(package))
    except (InvalidSignature, ValueError):
        raise WeightsError(
            f"{package}: the signature does not match {MANIFEST}: the package was changed after signing; "
            "refusing to load it"
        ) from None
    return f"signature valid (key {fingerprint(public_raw)})"
