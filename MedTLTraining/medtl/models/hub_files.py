"""torchvision's ImageNet weight files in the torch hub cache: where they go, what their hash must
be, how they get there (a confirmed download from torchvision's own URL, or a copy of a file the
user brings), without importing torch.

Torch-free on purpose: the Slicer module checks and fills the cache before it starts the engine,
and must not load torch into Slicer's own process for that. The URLs are torchvision's (its weight
enums give them; a test keeps this table equal to them) and the cache directory follows
``torch.hub.get_dir()``'s rule, so torchvision's own loader then finds the file and never downloads.

A download is streamed into a temporary file beside the target, hashed as it arrives, and renamed
into place only when its sha256 is the one MedTL knows (or, for files whose full digest MedTL has
not seen, starts with the prefix torchvision puts in the name): a tampered or truncated download
leaves nothing behind.

Example:
    >>> IMAGENET_FILES["mobilenet_v2"].file_name
    'mobilenet_v2-b0353104.pth'
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medtl.data.io import sha256_file
from medtl.errors import WeightsError

# Full sha256 of files we have seen byte for byte (the name only carries a prefix).
KNOWN_SHA256 = {
    "mobilenet_v2-b0353104.pth": "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
}

# (done bytes, total bytes or None when the server does not say) -> False to stop the download.
Progress = Callable[[int, "int | None"], "bool | None"]


class WeightsUnreachable(WeightsError):
    """The download could not reach its server (offline, proxy, firewall)."""


@dataclass(frozen=True)
class WeightFile:
    """One torchvision ImageNet weight file.

    Attributes:
        arch: the encoder architecture (``mobilenet_v2``).
        weight_name: torchvision's weight enum (``MobileNet_V2_Weights.IMAGENET1K_V1``).
        url: where torchvision downloads it from.
        size_mb: its size, for the confirmation a user sees before a download.
    """

    arch: str
    weight_name: str
    url: str
    size_mb: float

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def sha256(self) -> str | None:
        return KNOWN_SHA256.get(self.file_name)


_MODELS = "https://download.pytorch.org/models/"
IMAGENET_FILES = {
    w.arch: w
    for w in (
        WeightFile("mobilenet_v2", "MobileNet_V2_Weights.IMAGENET1K_V1", _MODELS + "mobilenet_v2-b0353104.pth", 13.6),
        WeightFile("resnet18", "ResNet18_Weights.IMAGENET1K_V1", _MODELS + "resnet18-f37072fd.pth", 44.7),
        WeightFile("resnet34", "ResNet34_Weights.IMAGENET1K_V1", _MODELS + "resnet34-b627a593.pth", 83.3),
        WeightFile("resnet50", "ResNet50_Weights.IMAGENET1K_V2", _MODELS + "resnet50-11ad3fa6.pth", 97.8),
        WeightFile("resnet101", "ResNet101_Weights.IMAGENET1K_V2", _MODELS + "resnet101-cd907fc2.pth", 170.5),
        WeightFile(
            "inception_v3", "Inception_V3_Weights.IMAGENET1K_V1", _MODELS + "inception_v3_google-0cc3c7bd.pth", 103.9
        ),
        WeightFile("vit_b_16", "ViT_B_16_Weights.IMAGENET1K_V1", _MODELS + "vit_b_16-c867db91.pth", 330.3),
        WeightFile("densenet121", "DenseNet121_Weights.IMAGENET1K_V1", _MODELS + "densenet121-a639ec97.pth", 30.8),
        WeightFile(
            "efficientnet_b0",
            "EfficientNet_B0_Weights.IMAGENET1K_V1",
            _MODELS + "efficientnet_b0_rwightman-7f5810bc.pth",
            20.5,
        ),
    )
}
_BY_FILE_NAME = {w.file_name: w for w in IMAGENET_FILES.values()}


def hub_dir() -> Path:
    """``torch.hub.get_dir()`` without torch: ``$TORCH_HOME/hub``, else ``$XDG_CACHE_HOME/torch/hub``,
    else ``~/.cache/torch/hub``."""
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return Path(os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch")))) / "hub"


def checkpoint_path(file_name: str) -> Path:
    """Where torchvision looks for ``file_name`` before it would download it."""
    return hub_dir() / "checkpoints" / file_name


def check_digest(digest: str, file_name: str, where: str | Path) -> None:
    """Raises :class:`WeightsError` unless ``digest`` is what ``file_name`` must hash to.

    Args:
        digest: the sha256 (hex) of the bytes.
        file_name: the torchvision file name they are meant to be.
        where: the file or URL they came from, for the message.
    """
    known = KNOWN_SHA256.get(file_name)
    if known is not None:
        if digest != known:
            raise WeightsError(
                f"{where}: sha256 {digest[:16]}… does not match the expected {known[:16]}… of {file_name}; refusing it"
            )
        return
    prefix = Path(file_name).stem.rsplit("-", 1)[-1]
    if len(prefix) >= 6 and all(c in "0123456789abcdef" for c in prefix) and not digest.startswith(prefix):
        raise WeightsError(
            f"{where}: sha256 {digest[:16]}… does not start with {prefix} as {file_name} says; refusing it"
        )


def verify_file(path: str | Path, file_name: str | None = None) -> str:
    """The file's sha256, if it is what its (or ``file_name``'s) name promises; else :class:`WeightsError`."""
    path = Path(path)
    digest = sha256_file(path)
    check_digest(digest, file_name or path.name, path)
    return digest


def is_cached(weight: WeightFile) -> bool:
    """The file is in the hub cache and hashes as it must."""
    path = checkpoint_path(weight.file_name)
    if not path.is_file():
        return False
    try:
        verify_file(path)
    except WeightsError:
        return False
    return True


@contextlib.contextmanager
def _temporary_beside(target: Path):
    """A temporary file in the target's folder (so the final rename is atomic), removed unless renamed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            yield tmp, out
    finally:
        tmp.unlink(missing_ok=True)


def install_file(source: str | Path, file_name: str | None = None) -> Path:
    """Copies a weight file the user brings into the hub cache, after checking its hash.

    Args:
        source: the file (e.g. downloaded on another computer).
        file_name: the torchvision file name it is (default: ``source``'s own name).

    Raises:
        WeightsError: an unknown name, a missing file, or a hash that does not match.
    """
    source = Path(source)
    name = file_name or source.name
    if name not in _BY_FILE_NAME:
        raise WeightsError(
            f"{source}: '{name}' is not a torchvision weight file MedTL uses; expected one of "
            + ", ".join(sorted(_BY_FILE_NAME))
        )
    if not source.is_file():
        raise WeightsError(f"weight file not found: {source}")
    check_digest(sha256_file(source), name, source)
    target = checkpoint_path(name)
    with _temporary_beside(target) as (tmp, out), open(source, "rb") as src:
        shutil.copyfileobj(src, out)
        out.close()
        os.replace(tmp, target)
    return target


def offline_message(weight: WeightFile, reason: str = "") -> str:
    """What a user without internet access does instead: which file, from where, to where."""
    return (
        f"Could not download the ImageNet weights of {weight.arch}{f' ({reason})' if reason else ''}. "
        f"On a computer with internet access download {weight.url} and either put {weight.file_name} at "
        f"{checkpoint_path(weight.file_name)} or run `medtl weights seed FILE` (inside Slicer: "
        f"`PythonSlicer -m medtl weights seed FILE`) with the downloaded file."
    )


def download(
    weight: WeightFile,
    *,
    url: str | None = None,
    progress: Progress | None = None,
    timeout_s: float = 30.0,
    chunk: int = 1 << 16,
) -> Path:
    """Downloads ``weight`` into the hub cache (nothing to do when a valid copy is there).

    Args:
        weight: the file.
        url: where from (default: torchvision's URL; tests serve the file locally).
        progress: called with (bytes so far, total bytes or None) after every chunk; returning
            False stops the download.
        timeout_s: how long to wait for the server at connection and between chunks.
        chunk: bytes read at a time.

    Returns:
        The file in the hub cache.

    Raises:
        WeightsUnreachable: the server could not be reached (with :func:`offline_message`).
        WeightsError: the download was stopped, or its bytes are not the expected file.
    """
    target = checkpoint_path(weight.file_name)
    if is_cached(weight):
        return target
    source = url or weight.url
    digest = hashlib.sha256()
    with _temporary_beside(target) as (tmp, out):
        try:
            with urllib.request.urlopen(source, timeout=timeout_s) as response:
                total = response.headers.get("Content-Length")
                total = int(total) if total and total.isdigit() else None
                done = 0
                while block := response.read(chunk):
                    out.write(block)
                    digest.update(block)
                    done += len(block)
                    if progress is not None and progress(done, total) is False:
                        raise WeightsError(f"download of {weight.file_name} stopped; nothing was saved")
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            reason = getattr(err, "reason", None) or err
            raise WeightsUnreachable(offline_message(weight, str(reason))) from None
        out.close()
        if total is not None and done != total:
            raise WeightsError(f"{source}: the download ended after {done} of {total} bytes; nothing was saved")
        check_digest(digest.hexdigest(), weight.file_name, source)
        os.replace(tmp, target)
    return target
