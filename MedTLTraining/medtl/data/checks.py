"""Checks made before any computation: on the images and labels as they are read, and on the
paths a command will write. Each failure is one line naming the file (and the CSV row).

Torch-free, like the rest of the protocol modules: the Slicer side may use these checks too.

Example:
    >>> import numpy as np, SimpleITK as sitk
    >>> image = sitk.GetImageFromArray(np.array([[[0.0, np.nan]]], np.float32))
    >>> checked_image(image, "ct.nrrd", row=3)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    medtl.errors.DataError: row 3, image ct.nrrd: 1 NaN and 0 infinite voxel(s) of 2; fix the file or set ...
    >>> sitk.GetArrayFromImage(checked_image(image, "ct.nrrd", policy="zero")).tolist()
    [[[0.0, 0.0]]]
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medtl.errors import DataError, OutputError, RunFailure

NAN_POLICIES = ("error", "zero")
# Kept free beyond an output's estimated size: file system metadata, temporary names, logs.
SPARE_BYTES = 16 << 20


def where(path: str | Path, *, row: int | None = None, what: str = "image") -> str:
    """``row 3, label /data/case3_seg.nrrd`` (the CSV row as a spreadsheet shows it)."""
    return (f"row {row}, " if row is not None else "") + f"{what} {path}"


def check_scalar_volume(image: sitk.Image, path: str | Path, *, row: int | None = None, what: str = "image") -> None:
    """A 3D image with one value per voxel; 2D, 4D and vector images are refused."""
    size = "×".join(map(str, image.GetSize()))
    dims = image.GetDimension()
    if dims != 3:
        hint = "a single slice" if dims == 2 else "a time series or a multi-channel stack"
        raise DataError(f"{where(path, row=row, what=what)}: a {dims}D image ({size}, {hint}); a 3D volume is needed")
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise DataError(
            f"{where(path, row=row, what=what)}: {components} values per voxel (a colour or vector image); "
            "a scalar volume with one value per voxel is needed"
        )


def _is_float(image: sitk.Image) -> bool:
    return np.issubdtype(sitk.GetArrayViewFromImage(image).dtype, np.floating)


def finite_image(
    image: sitk.Image, path: str | Path, *, row: int | None = None, policy: str = "error", what: str = "image"
) -> sitk.Image:
    """``image`` when every voxel is finite; NaN and infinite voxels are an error, or with
    ``policy="zero"`` (``preprocessing.nan_policy``) become 0 in a copy. The input is not changed."""
    if policy not in NAN_POLICIES:
        raise ValueError(f"unknown nan_policy {policy!r}")
    if not _is_float(image):
        return image  # integer voxels are always finite
    array = sitk.GetArrayViewFromImage(image)
    bad = ~np.isfinite(array)
    if not bad.any():
        return image
    if policy == "zero":
        fixed = np.where(bad, 0, array).astype(array.dtype)
        out = sitk.GetImageFromArray(fixed, isVector=image.GetNumberOfComponentsPerPixel() > 1)
        out.CopyInformation(image)
        return out
    nans = int(np.isnan(array).sum())
    raise DataError(
        f"{where(path, row=row, what=what)}: {nans} NaN and {int(bad.sum()) - nans} infinite voxel(s) of "
        f"{array.size}; fix the file or set preprocessing.nan_policy to 'zero'"
    )


def integer_labels(image: sitk.Image, path: str | Path, *, row: int | None = None) -> None:
    """A label map stored as floats must hold whole numbers only: casting 0.5 to an integer
    would silently turn one structure into another."""
    if not _is_float(image):
        return
    array = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(array)
    fractional = finite & (array != np.round(array))
    count = int(fractional.sum() + (~finite).sum())
    if count:
        example = array[fractional].flat[0] if fractional.any() else array[~finite].flat[0]
        raise DataError(
            f"{where(path, row=row, what='label')}: {count} voxel(s) are not whole-number label values "
            f"(e.g. {float(example):g}); a label map holds integers 0, 1, 2 ..."
        )


def checked_image(
    image: sitk.Image, path: str | Path, *, row: int | None = None, policy: str = "error", scalar_3d: bool = True
) -> sitk.Image:
    """An image as read, checked: a scalar 3D volume (unless ``scalar_3d`` is off, for 2D
    classifiers) with finite voxels (or NaN/inf zeroed, per ``policy``)."""
    if scalar_3d:
        check_scalar_volume(image, path, row=row)
    return finite_image(image, path, row=row, policy=policy)


def checked_label(image: sitk.Image, path: str | Path, *, row: int | None = None) -> sitk.Image:
    """A label map as read, checked: a scalar 3D volume of whole numbers."""
    check_scalar_volume(image, path, row=row, what="label")
    integer_labels(image, path, row=row)
    return image


def _read(path: str | Path, row: int | None, what: str) -> sitk.Image:
    from medtl.data.io import read_image

    try:
        return read_image(path)
    except DataError as err:  # a damaged or disguised file: say which CSV row holds it
        if row is None:
            raise
        raise DataError(f"row {row}, {what}: {err}") from None


def read_checked_image(
    path: str | Path, *, row: int | None = None, policy: str = "error", scalar_3d: bool = True
) -> sitk.Image:
    """:func:`checked_image` of the file at ``path``; a file that cannot be read names its row too."""
    return checked_image(_read(path, row, "image"), path, row=row, policy=policy, scalar_3d=scalar_3d)


def read_checked_label(path: str | Path, *, row: int | None = None) -> sitk.Image:
    """:func:`checked_label` of the file at ``path``; a file that cannot be read names its row too."""
    return checked_label(_read(path, row, "label"), path, row=row)


# --------------------------------------------------------------------------- outputs


@functools.lru_cache(maxsize=64)
def _can_write(name: str) -> bool:
    """Whether SimpleITK has an ImageIO that writes a 3D image under this file name: it is asked
    to, with a 2×2×2 image in a private temporary folder."""
    try:
        with tempfile.TemporaryDirectory(prefix="medtl-probe-") as folder:
            sitk.WriteImage(sitk.Image(2, 2, 2, sitk.sitkUInt8), str(Path(folder) / name))
        return True
    except RuntimeError:
        return False
    except OSError:
        return True  # the temporary folder is the problem, not the name: the real write will tell


def check_image_output(path: str | Path, *, option: str = "--out") -> Path:
    """An image output path SimpleITK can write (by its extension), that is not a folder."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path}: is a folder; name a file such as seg.nrrd")
    if not _can_write(path.name.lower()):
        raise OutputError(
            f"{option} {path}: no image writer for this file name; use .nrrd, .seg.nrrd, .nii.gz, .nii or .mha"
        )
    return path


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_not_inputs(outputs: dict[str, str | Path | None], inputs: Iterable[str | Path]) -> None:
    """No output is an input (or another output): writing it would destroy the data read."""
    given = [(option, Path(p)) for option, p in outputs.items() if p]
    for option, out in given:
        for source in inputs:
            if _same_file(out, Path(source)):
                raise OutputError(f"{option} {out}: is an input of this command; writing it would destroy it")
    for i, (option, out) in enumerate(given):
        for other, second in given[i + 1 :]:
            if _same_file(out, second):
                raise OutputError(f"{option} and {other} name the same file {out}; give each its own")


def existing_folder(path: str | Path) -> Path:
    """The nearest folder that exists on the way up from ``path`` (where it would be created)."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            return candidate
    return Path(path.anchor)


def check_free_space(path: str | Path, need_bytes: int, *, what: str) -> None:
    """Roughly enough free space for ``what`` at ``path`` (a file or folder to be written)."""
    folder = existing_folder(Path(path).parent if not Path(path).is_dir() else path)
    free = shutil.disk_usage(folder).free
    if free < need_bytes + SPARE_BYTES:
        raise RunFailure(
            f"{path}: only {free / 1e6:.1f} MB free on its disk, {what} needs about "
            f"{(need_bytes + SPARE_BYTES) / 1e6:.1f} MB; free some space or write elsewhere"
        )
