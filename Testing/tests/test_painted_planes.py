"""The planes behind a painted mask: strokes in any view, neighbouring slices, oblique views."""

from __future__ import annotations

import numpy as np
import pytest
from MedTLExtensionLib.painted_planes import ObliquePaintingError, dominant_axis, find_planes


def disc(shape, centre, radius):
    j, i = np.indices(shape)
    return (j - centre[0]) ** 2 + (i - centre[1]) ** 2 < radius**2


def test_axial_strokes_are_k_slices_even_when_a_slice_is_empty_of_structure():
    mask = np.zeros((20, 40, 40), bool)
    for k in (3, 9, 15):
        mask[k] = disc((40, 40), (20, 20), 8 + k % 4)
    assert find_planes(mask) == {(0, 3), (0, 9), (0, 15)}


def test_strokes_in_the_sagittal_and_coronal_views_are_i_and_j_slices():
    mask = np.zeros((30, 40, 50), bool)
    mask[5:25, 10:30, 12] = disc((20, 20), (10, 10), 9)  # sagittal view: one I index
    mask[5:25, 31, 10:40] = disc((20, 30), (10, 15), 9)  # coronal view: one J index
    planes = find_planes(mask)
    assert planes == {(2, 12), (1, 31)}
    assert dominant_axis({(2, 12), (2, 30), (1, 31)}, mask) == 2


def test_neighbouring_painted_slices_are_slices_not_an_oblique_stroke():
    mask = np.zeros((10, 30, 30), bool)
    mask[4] = disc((30, 30), (15, 15), 9)
    mask[5] = disc((30, 30), (15, 16), 9)
    assert find_planes(mask) == {(0, 4), (0, 5)}


def test_a_stroke_on_an_oblique_view_is_refused_with_what_to_do():
    # A disc on a plane tilted 30 degrees about the J axis: k = round(i * tan 30) + 2.
    mask = np.zeros((30, 40, 40), bool)
    j, i = np.nonzero(disc((40, 40), (20, 20), 12))
    mask[np.round(i * np.tan(np.deg2rad(30))).astype(int) + 2, j, i] = True
    with pytest.raises(ObliquePaintingError, match="Rotate to volume plane"):
        find_planes(mask)


def test_a_single_click_is_one_plane_along_the_axis_the_user_paints_along():
    mask = np.zeros((10, 10, 10), bool)
    mask[2, 1:8, 1:8] = True
    mask[7, 5, 5] = True  # one voxel: any axis would hold it; the user paints axial slices
    assert find_planes(mask) == {(0, 2), (0, 7)}
    assert find_planes(np.zeros((3, 3, 3), bool)) == set()
