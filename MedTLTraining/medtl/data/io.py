"""Image I/O through SimpleITK, always with geometry (spacing, origin, direction).

Reads NIfTI, NRRD, MHA and DICOM series (a directory). Writes atomically: a temporary name in
the same folder, then a rename, so an existing file is never left half-written.

Example:
    >>> import numpy as np, SimpleITK as sitk, tempfile, os
    >>> img = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16)); img.SetSpacing((0.5, 0.5, 2.0))
    >>> path = os.path.join(tempfile.mkdtemp(), "x.nrrd"); write_image(img, path)
    >>> read_image(path).GetSpacing()
    (0.5, 0.5, 2.0)
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medtl.errors import DataError, RunFailure


def read_image(path: str | Path) -> sitk.Image:
    """Reads an image file or a DICOM series directory (the series with the most files)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"image not found: {path}")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise DataError(f"{path}: directory holds no DICOM series")
            files = max((reader.GetGDCMSeriesFileNames(str(path), s) for s in series), key=len)
            reader.SetFileNames(files)
            return reader.Execute()
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown error"
        raise DataError(f"{path}: cannot read image ({first})") from None


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` as the process's umask lets a new file have it (umask is only readable by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


class WriteFailure(RunFailure):
    """A file that could not be written; also an instance of the writer's own error's kind
    (OSError, or RuntimeError as torch.save and ITK raise), for callers that catch those."""


class _OSWriteFailure(WriteFailure, OSError):
    pass


class _RuntimeWriteFailure(WriteFailure, RuntimeError):
    pass


def writing_failure(path: str | Path, err: BaseException) -> WriteFailure:
    """One line for a write that failed: a full disk, a permission, or the writer's own message.

    torch.save and ITK report a full disk without its errno ("iostream error", "could not write
    file"), so a disk that is (nearly) full after a failed write is named as the cause.
    """
    path = Path(path)
    number = getattr(err, "errno", None)
    try:
        nearly_full = shutil.disk_usage(path.parent).free < (1 << 20)
    except OSError:
        nearly_full = False
    if number == errno.ENOSPC or nearly_full:
        reason = "no space left on the device"
    elif number in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = "permission denied" if number != errno.EROFS else "read-only file system"
    else:
        lines = str(err).strip().splitlines()
        reason = (getattr(err, "strerror", None) or (lines[-1] if lines else type(err).__name__)).strip()
    kind = _OSWriteFailure if isinstance(err, OSError) else _RuntimeWriteFailure
    return kind(f"cannot write {path}: {reason}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renames it onto ``path`` only on success.

    The file gets the permissions a plain ``open`` would give it (0666 less the umask), not the
    0600 of a temporary file, so colleagues on a shared drive can read it. A failed write raises
    :class:`~medtl.errors.RunFailure` naming ``path``; any earlier file there is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Keep the full suffix (".seg.nrrd", ".nii.gz") so writers pick the right format.
        suffix = "".join(path.suffixes) or ".tmp"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise writing_failure(path, err) from err
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, umask_mode())
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as err:  # RuntimeError: torch.save's and ITK's write errors
        raise writing_failure(path, err) from err
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def replace_directory(built: Path, path: Path) -> None:
    """Puts the directory ``built`` (made beside ``path``) in ``path``'s place, so a reader sees
    the old directory or the new one, never half of either. It gets the permissions a new folder
    would (0777 less the umask), not mkdtemp's 0700, so colleagues on a shared drive can open it."""
    built.chmod(umask_mode(0o777))
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        built.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        built.rename(path)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_image(image: sitk.Image, path: str | Path, *, compress: bool = True) -> None:
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), compress)


def array_like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """An image from ``array`` (z, y, x) with exactly the reference's geometry."""
    image = sitk.GetImageFromArray(array)
    if image.GetSize() != reference.GetSize():
        raise ValueError(f"array size {image.GetSize()} differs from reference {reference.GetSize()}")
    image.CopyInformation(reference)
    return image


def write_segmentation(
    labels: np.ndarray,
    reference: sitk.Image,
    path: str | Path,
    segments: Sequence[tuple[int, str, tuple[float, float, float]]],
) -> None:
    """Writes a label array as a Slicer ``.seg.nrrd``: one segment per (value, name, colour).

    Slicer reads the ``SegmentN_*`` header fields, so segment names, colours and label values are
    kept; the voxel grid is the reference image's.
    """
    image = array_like(labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16), reference)
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    for i, (value, name, colour) in enumerate(segments):
        key = f"Segment{i}_"
        image.SetMetaData(key + "ID", f"Segment_{value}")
        image.SetMetaData(key + "Name", name)
        image.SetMetaData(key + "NameAutoGenerated", "0")
        image.SetMetaData(key + "Color", " ".join(f"{c:.6g}" for c in colour))
        image.SetMetaData(key + "ColorAutoGenerated", "0")
        image.SetMetaData(key + "LabelValue", str(value))
        image.SetMetaData(key + "Layer", "0")
        image.SetMetaData(key + "Extent", _extent(labels == value))
        image.SetMetaData(key + "Tags", f"MedTL.LabelValue:{value}|")
    write_image(image, path)


def read_segment_names(path: str | Path) -> dict[int, str]:
    """Label value -> segment name from a ``.seg.nrrd`` header (empty for plain label maps)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    keys = set(reader.GetMetaDataKeys())
    names: dict[int, str] = {}
    i = 0
    while f"Segment{i}_Name" in keys:
        value_key = f"Segment{i}_LabelValue"
        value = int(reader.GetMetaData(value_key)) if value_key in keys else i + 1
        names[value] = reader.GetMetaData(f"Segment{i}_Name")
        i += 1
    return names


def _extent(mask: np.ndarray) -> str:
    # NRRD extents are in (i, j, k) = (x, y, z) order; the array is (z, y, x).
    if not mask.any():
        return "0 -1 0 -1 0 -1"
    bounds = []
    for axis in (2, 1, 0):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.nonzero(mask.any(axis=other))[0]
        bounds += [int(idx[0]), int(idx[-1])]
    return " ".join(map(str, bounds))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def resample_to_spacing(image: sitk.Image, spacing_zyx: Sequence[float], *, labels: bool = False) -> sitk.Image:
    """The image on a grid of ``spacing_zyx`` (mm) over the same physical extent, origin and
    direction; linear for intensities, nearest neighbour for label maps."""
    new_spacing = [float(s) for s in reversed(spacing_zyx)]  # SimpleITK orders (x, y, z)
    size = [
        max(1, int(round(n * old / new)))
        for n, old, new in zip(image.GetSize(), image.GetSpacing(), new_spacing, strict=True)
    ]
    return sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkNearestNeighbor if labels else sitk.sitkLinear,
        image.GetOrigin(),
        new_spacing,
        image.GetDirection(),
        0,
        image.GetPixelID(),
    )


def resample_like(image: sitk.Image, reference: sitk.Image, *, labels: bool = False) -> sitk.Image:
    """``image`` on exactly ``reference``'s grid (back from a working spacing to the input's).

    The coarser grid's outer voxel centres lie inside the input's extent; the rim beyond them takes
    the nearest value instead of 0, so no input voxel is left without a prediction.
    """
    return sitk.Resample(
        image,
        reference,
        sitk.Transform(),
        sitk.sitkNearestNeighbor if labels else sitk.sitkLinear,
        0.0,
        image.GetPixelID(),
        True,  # useNearestNeighborExtrapolator
    )
