"""``medtl drift``: do new images still look like the training images?

A deployed model is watched by comparing the images it now receives with those it was trained
on, in two ways:

- **intensity and header statistics** per image (after the package's preprocessing, and raw):
  each compared by a two-sample Kolmogorov-Smirnov test (SciPy), p-values corrected for the
  number of features (Benjamini-Hochberg), with the shift in reference standard deviations;
- **the network's own view**: the deepest encoder stage's features, averaged over the image
  (projected on a PCA of the reference when the reference would be too large to store). For the
  set, a classifier two-sample test: can a logistic regression tell new from reference embeddings
  (cross-validated AUROC, permutation p-value, scikit-learn)? For each image, its distance to the
  reference centre in reference standard deviations per dimension, against the reference images'
  leave-one-out distances (their 99th percentile from 100 images on, else their largest);
- **images far outside the reference**: a new image whose intensity statistics lie, as a whole
  (their median), more than :data:`OUTLIER_SD` reference standard deviations from the reference
  mean is drift by itself, however few images either side holds: the tests above cannot reject
  anything with a handful of images, but a scanner that maps HU differently is obvious in one.
  The median, not the largest, of the statistics: with three reference images one statistic's
  standard deviation can be small by chance (a like image reached 12 SD on one, 2.6 on the median).

The reference profile is computed at the end of training and stored in the model package
(``drift_reference.json``); for older packages, ``--reference train.csv`` profiles it on the fly.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> ref = {"features": ["mean"], "values": rng.normal(0, 1, (30, 1)).tolist(), "embedding": None}
    >>> new = {"features": ["mean"], "values": rng.normal(3, 1, (30, 1)).tolist(), "embedding": None}
    >>> compare_profiles(ref, new)["drift"], compare_profiles(ref, ref)["drift"]
    (True, False)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from medtl.config import RunConfig
from medtl.data.checks import read_checked_image
from medtl.data.io import atomic_write_text
from medtl.errors import DataError

REFERENCE_FILE = "drift_reference.json"
PROFILE_VERSION = 1
MAX_SLICES = 16  # 2D networks: axial slices sampled per image for its embedding
MAX_STORED = 400_000  # numbers of reference embeddings kept as they are (a few MB of JSON)
LOW_POWER = 5  # fewer images than this on either side: a test can hardly reject anything
OUTLIER_SD = 6.0  # an image this many reference SDs away (median over INTENSITY) is drift
OUTLIER_MIN_REFERENCE = 3  # two images give one difference, not a standard deviation
INTENSITY = ("mean", "p01", "p05", "p50", "p95", "p99", "raw_mean", "raw_p01", "raw_p99")
FEATURES = (
    "mean", "std", "p01", "p05", "p50", "p95", "p99", "fraction_low", "fraction_high",
    "raw_mean", "raw_p01", "raw_p99", "spacing_z", "spacing_y", "spacing_x",
)  # fmt: skip


def _intensity_features(image: sitk.Image, array: np.ndarray) -> list[float]:
    raw = sitk.GetArrayViewFromImage(image).astype(np.float32)
    p = np.percentile(array, [1, 5, 50, 95, 99])
    spacing = list(reversed(image.GetSpacing())) + [1.0] * (3 - image.GetDimension())
    return [
        float(array.mean()),
        float(array.std()),
        *map(float, p),
        float((array <= 1e-6).mean()),
        float((array >= 1 - 1e-6).mean()),
        float(raw.mean()),
        float(np.percentile(raw, 1)),
        float(np.percentile(raw, 99)),
        *map(float, spacing[:3]),
    ]


def _embedding_module(model: torch.nn.Module) -> torch.nn.Module | None:
    from medtl.models.registry import stage_output_module

    stages = model.encoder_stages() if hasattr(model, "encoder_stages") else []
    if stages:
        return stage_output_module(stages[-1])
    convs = [m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    return convs[len(convs) // 2] if convs else None  # the bottom of a plain U-Net


@torch.no_grad()
def _embedding(model: torch.nn.Module, module: torch.nn.Module, cfg: RunConfig, array: np.ndarray, device) -> list:
    from monai.transforms import Resize

    from medtl.data.slices import slice_stack
    from medtl.models.registry import pool_stage_output, stage_tensor

    captured: list[torch.Tensor] = []

    def hook(_m, _i, output):
        captured.append(pool_stage_output(stage_tensor(output)))

    handle = module.register_forward_hook(hook)
    try:
        model.eval().to(device)
        if cfg.is_classification or cfg.spatial_dims == 3:
            size = tuple(cfg.preprocessing.patch_size)
            x = torch.as_tensor(Resize(spatial_size=size, mode="area")(torch.from_numpy(array[None]))).float()
            model(x[None].to(device))
        else:
            z = np.unique(np.linspace(0, array.shape[0] - 1, min(MAX_SLICES, array.shape[0])).round().astype(int))
            context = cfg.preprocessing.context_slices
            chunk = np.stack([slice_stack(array, i, context) if context else array[i][None] for i in z])
            divisor = getattr(getattr(model, "spec", None), "divisor", 32)
            x = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))
            x = torch.nn.functional.pad(x, (0, -x.shape[-1] % divisor, 0, -x.shape[-2] % divisor))
            model(x.to(device))
    finally:
        handle.remove()
    return torch.cat(captured).float().mean(0).cpu().tolist()


def _checks(cfg: RunConfig) -> dict[str, Any]:
    return {"policy": cfg.preprocessing.nan_policy, "scalar_3d": not cfg.is_classification}


def profile_images(
    model: torch.nn.Module,
    cfg: RunConfig,
    images: Sequence[sitk.Image | str | Path],
    *,
    device: str | torch.device = "cpu",
    events=None,
) -> dict[str, Any]:
    """Per-image statistics and embeddings (JSON-able) of ``images`` as the model sees them."""
    from medtl.package import preprocess

    module = _embedding_module(model)
    values, embeddings = [], []
    for i, item in enumerate(images):
        ndim = cfg.spatial_dims if cfg.is_classification else 3
        # NaN voxels would make every statistic NaN and every test silently pass.
        image = item if isinstance(item, sitk.Image) else read_checked_image(item, **_checks(cfg))
        array = preprocess(image, cfg, ndim=ndim)
        values.append(_intensity_features(image, array))
        if module is not None:
            embeddings.append(_embedding(model, module, cfg, array, device))
        if events is not None:
            events.emit("step", label="profile", step=i + 1, total_steps=len(images))
    return {
        "version": PROFILE_VERSION,
        "features": list(FEATURES),
        "values": values,
        "embedding": {"vectors": embeddings} if embeddings else None,
    }


def reduce_reference(profile: dict[str, Any]) -> dict[str, Any]:
    """The reference, kept small: embeddings as they are while the reference holds at most
    :data:`MAX_STORED` numbers, else projected on their first principal components (the PCA is
    stored, new embeddings go through the same projection)."""
    from sklearn.decomposition import PCA

    emb = profile.get("embedding")
    if not emb or "vectors" not in emb:
        return profile
    vectors = np.asarray(emb["vectors"], np.float64)
    if vectors.size <= MAX_STORED:
        return {**profile, "embedding": {"vectors": vectors.round(6).tolist()}}
    components = max(1, min(MAX_STORED // len(vectors), len(vectors) - 1, vectors.shape[1]))
    pca = PCA(n_components=components).fit(vectors)
    return {
        **profile,
        "embedding": {
            "mean": pca.mean_.round(6).tolist(),
            "components": pca.components_.round(6).tolist(),
            "vectors": pca.transform(vectors).round(6).tolist(),
        },
    }


def reference_bytes(profile: dict[str, Any]) -> bytes:
    return (json.dumps(reduce_reference(profile)) + "\n").encode()


def load_reference(package) -> dict[str, Any] | None:
    """The package's stored reference profile (an ensemble: its first member's), or None."""
    package = package.members[0] if hasattr(package, "members") else package
    if REFERENCE_FILE not in package.manifest.get("files", {}):
        return None
    return json.loads((package.path / REFERENCE_FILE).read_text(encoding="utf-8"))


def _embeddings(reference: dict[str, Any], profile: dict[str, Any]) -> np.ndarray | None:
    """``profile``'s embeddings in the reference's space (its PCA, when it was reduced)."""
    emb = profile.get("embedding") or {}
    if "vectors" not in emb:
        return None
    vectors = np.asarray(emb["vectors"], np.float64)
    ref = reference.get("embedding") or {}
    if emb is ref or "components" in emb or "vectors" not in ref:
        return vectors
    width = len(ref["mean"]) if "components" in ref else np.asarray(ref["vectors"]).shape[-1]
    if vectors.shape[-1] != width:
        # Older MedTL averaged a ViT's tokens over their channels (one number per token), not over the tokens.
        raise DataError(
            f"the drift reference holds encoder features of {width} dimensions, these images give "
            f"{vectors.shape[-1]}: the reference comes from an older MedTL; give the training images with "
            "--reference train.csv"
        )
    if "components" in ref:
        vectors = (vectors - np.asarray(ref["mean"])) @ np.asarray(ref["components"]).T
    return vectors


def _embedding_test(ref: np.ndarray, cur: np.ndarray, seed: int = 0) -> float:
    """p-value of a classifier two-sample test: can a linear model tell reference from new
    embeddings better than chance? (scikit-learn's permutation test of its cross-validated score)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, permutation_test_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([ref, cur])
    y = np.r_[np.zeros(len(ref)), np.ones(len(cur))]
    folds = StratifiedKFold(n_splits=min(5, len(ref), len(cur)), shuffle=True, random_state=seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    _, _, p = permutation_test_score(
        model, x, y, cv=folds, n_permutations=199, scoring="roc_auc", random_state=seed, n_jobs=1
    )
    return float(p)


def _distances(ref: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Distance to the reference's centre in reference standard deviations (per dimension),
    scaled by sqrt(dimensions): about 1 for a typical reference image."""
    # One reference point has no spread (numpy would warn and give NaN): unit scale, as for a constant.
    centre, sd = ref.mean(0), ref.std(0, ddof=1) if len(ref) > 1 else np.ones(ref.shape[1])
    sd = np.where(sd > 1e-12, sd, 1.0)
    return np.sqrt((((points - centre) / sd) ** 2).mean(1))


def _feature_tests(names: Sequence[str], ref: np.ndarray, cur: np.ndarray, alpha: float) -> list[dict[str, Any]]:
    """Per feature: a KS test, Benjamini-Hochberg q-values, the shift in reference SDs; most shifted first."""
    from scipy.stats import false_discovery_control, ks_2samp

    features, p_values = [], []
    for j, name in enumerate(names):
        sd = float(ref[:, j].std(ddof=1)) if len(ref) > 1 else 0.0
        shift = float(cur[:, j].mean() - ref[:, j].mean())
        constant = np.ptp(ref[:, j]) == 0 and np.ptp(cur[:, j]) == 0
        p = 1.0 if constant and shift == 0 else float(ks_2samp(ref[:, j], cur[:, j]).pvalue)
        p_values.append(p)
        features.append(
            {
                "feature": name,
                "reference_mean": float(ref[:, j].mean()),
                "new_mean": float(cur[:, j].mean()),
                "shift_sd": shift / sd if sd > 0 else (0.0 if shift == 0 else float("inf")),
                "p": p,
            }
        )
    q_values = false_discovery_control(p_values) if p_values else []
    for entry, q in zip(features, q_values, strict=True):
        entry["q"] = float(q)
        entry["drifted"] = bool(q < alpha)
    return sorted(features, key=lambda e: e["q"])


def _image_flags(names: Sequence[str], ref: np.ndarray, cur: np.ndarray) -> tuple[list[dict[str, Any]], int]:
    """Per new image: statistics beyond 4 reference SDs, and whether its intensity statistics as a
    whole lie beyond :data:`OUTLIER_SD`; with how many images do."""
    images: list[dict[str, Any]] = [{"index": i, "flags": []} for i in range(len(cur))]
    mean, sd = ref.mean(0), ref.std(0, ddof=1) if len(ref) > 1 else np.ones(ref.shape[1])
    intensity = [names.index(n) for n in INTENSITY if n in names]
    outliers = 0
    for i, row in enumerate(cur):
        z = np.where(sd > 0, (row - mean) / np.where(sd > 0, sd, 1), 0.0)
        images[i]["flags"] += [f"{names[j]} {z[j]:+.1f} SD" for j in np.flatnonzero(np.abs(z) > 4)]
        if len(ref) >= OUTLIER_MIN_REFERENCE and intensity:
            # A statistic constant in the reference is infinitely far when it differs at all.
            away = np.where(sd > 0, np.abs(row - mean) / np.where(sd > 0, sd, 1), np.where(row == mean, 0, np.inf))
            distance = float(np.median(away[intensity]))
            images[i]["intensity_sd"] = distance
            if distance > OUTLIER_SD:
                outliers += 1
                images[i]["flags"].append(
                    f"intensity {distance:.0f} reference SDs from the reference (median of its statistics; "
                    f"limit {OUTLIER_SD:g})"
                )
    return images, outliers


def _embedding_comparison(
    reference: dict[str, Any], new: dict[str, Any], images: list[dict[str, Any]], alpha: float
) -> dict[str, Any] | None:
    """The set-level test of the embeddings; flags the images far from the reference in ``images``.
    None without embeddings on both sides (two at least)."""
    ref_emb, cur_emb = _embeddings(reference, reference), _embeddings(reference, new)
    if ref_emb is None or cur_emb is None or min(len(ref_emb), len(cur_emb)) < 2:
        return None
    p = _embedding_test(ref_emb, cur_emb)
    # Leave-one-out distances of the reference images: in-sample ones would be too small.
    loo = np.array([_distances(np.delete(ref_emb, i, 0), ref_emb[i : i + 1])[0] for i in range(len(ref_emb))])
    distances = _distances(ref_emb, cur_emb)
    limit = float(np.percentile(loo, 99)) if len(loo) >= 100 else float(loo.max())
    for i, d in enumerate(distances):
        images[i]["embedding_distance"] = float(d)
        if d > limit:
            images[i]["flags"].append(f"encoder features {d:.2f} from the reference (limit {limit:.2f})")
    return {
        "p": p,
        "drifted": p < alpha,
        "test": "classifier two-sample test (logistic regression, cross-validated AUROC, 199 permutations)",
        "reference_distance_median": float(np.median(loo)),
        "new_distance_median": float(np.median(distances)),
        "outlier_limit": limit,
        "dimensions": int(ref_emb.shape[1]),
    }


def _power_notes(reference_images: int, new_images: int) -> list[str]:
    """What the tests cannot see with this few images."""
    if min(reference_images, new_images) >= LOW_POWER:
        return []
    still = (
        f"images more than {OUTLIER_SD:g} reference SDs away still count"
        if reference_images >= OUTLIER_MIN_REFERENCE
        else f"with fewer than {OUTLIER_MIN_REFERENCE} reference images not even far outliers are found"
    )
    return [
        f"only {min(reference_images, new_images)} image(s) on one side: the tests can hardly detect anything; {still}"
    ]


def _summary(result: dict[str, Any], notes: list[str]) -> str:
    """One line: the drift found, its strongest signs, and how many images were flagged."""
    images, outliers = result["images"], result["outside_reference"]
    parts = [
        f"{e['feature']} {'higher' if e['shift_sd'] > 0 else 'lower'} by {abs(e['shift_sd']):.1f} SD (q={e['q']:.3g})"
        for e in result["features"]
        if e["drifted"]
    ][:5]
    if result["embedding"] and result["embedding"]["drifted"]:
        parts.append(f"the network's features differ (p={result['embedding']['p']:.3g})")
    if outliers:
        parts.append(
            f"{outliers} of {len(images)} image(s) far outside the reference (intensity > {OUTLIER_SD:g} reference SDs)"
        )
    flagged = sum(1 for im in images if im["flags"])
    summary = ("DRIFT: " + "; ".join(parts)) if result["drift"] else "no drift detected"
    if flagged:
        summary += f"; {flagged} of {len(images)} image(s) flagged individually"
    return summary + ("" if not notes else f" ({'; '.join(notes)})")


def compare_profiles(reference: dict[str, Any], new: dict[str, Any], *, alpha: float = 0.05) -> dict[str, Any]:
    """Whether (set level) and where (features, images) ``new`` differs from ``reference``."""
    names = reference["features"]
    ref, cur = np.asarray(reference["values"], np.float64), np.asarray(new["values"], np.float64)
    if ref.shape[1] != cur.shape[1]:
        raise DataError("the reference and the new profile hold different features; profile both with this MedTL")
    result: dict[str, Any] = {
        "alpha": alpha,
        "reference_images": int(len(ref)),
        "new_images": int(len(cur)),
        "features": _feature_tests(names, ref, cur, alpha),
    }
    images, outliers = _image_flags(names, ref, cur)
    result["embedding"] = _embedding_comparison(reference, new, images, alpha)
    embedding_drift = bool(result["embedding"] and result["embedding"]["drifted"])
    result["outside_reference"] = outliers
    result["drift"] = any(e["drifted"] for e in result["features"]) or embedding_drift or outliers > 0
    result["images"] = images
    notes = _power_notes(len(ref), len(cur))
    result["summary"] = _summary(result, notes)
    result["notes"] = notes
    return result


def drift_figure(path: str | Path, reference: dict[str, Any], new: dict[str, Any], result: dict[str, Any]) -> Path:
    """Reference against new values of the most shifted features, and the PCA view."""
    from medtl.report import _pyplot, save_figure

    plt = _pyplot()
    names = reference["features"]
    top = [e["feature"] for e in result["features"][:4]]
    fig, axes = plt.subplots(1, len(top) + 1, figsize=(3.4 * (len(top) + 1), 3.2))
    ref, cur = np.asarray(reference["values"]), np.asarray(new["values"])
    for ax, name in zip(axes, top, strict=False):
        j = names.index(name)
        ax.hist([ref[:, j], cur[:, j]], bins=12, label=["reference", "new"], color=["tab:blue", "tab:orange"])
        entry = next(e for e in result["features"] if e["feature"] == name)
        ax.set_title(f"{name}\nq={entry['q']:.2g}" + (" (drift)" if entry["drifted"] else ""), fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[-1]
    emb_ref, emb_new = _embeddings(reference, reference), _embeddings(reference, new)
    if emb_ref is not None and emb_new is not None and min(len(emb_ref), emb_ref.shape[1]) >= 2:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2).fit(emb_ref)
        for points, label in ((emb_ref, "reference"), (emb_new, "new")):
            xy = pca.transform(points)
            ax.scatter(xy[:, 0], xy[:, 1], s=12, label=label)
        ax.set(xlabel="PC 1", ylabel="PC 2", title="encoder features (PCA of the reference)")
        ax.legend(fontsize=7)
    else:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def _profile_csv(package, csv: str | Path, *, device, events) -> dict[str, Any]:
    """The profile of a CSV's images, each tagged with its CSV row."""
    from medtl.data.dataset import load_cases

    member = package.members[0] if hasattr(package, "members") else package
    cases = load_cases(csv, require_labels=False, label_files=False)
    images = [c.image for c in cases]
    # One-BatchNorm-per-site packages are profiled through their default (else first) site.
    domain = (member.manifest.get("default_domain") or member.domains[0]) if member.domains else None
    with member.domain_context(domain):
        profile = profile_images(member.model, member.config, images, device=device, events=events)
    profile["rows"] = [c.row for c in cases]
    return profile


def run_drift(
    package_path: str | Path,
    data_csv: str | Path,
    *,
    reference_csv: str | Path | None = None,
    out_dir: str | Path,
    alpha: float = 0.05,
    device: str | torch.device = "cpu",
    events=None,
) -> dict[str, Any]:
    """Profiles ``data_csv``'s images, compares them with the package's reference (or with
    ``reference_csv``'s images), writes ``drift.json`` and ``drift.png`` and returns the result."""
    from medtl.any_package import load_package

    package = load_package(package_path)
    if reference_csv:
        reference = reduce_reference(_profile_csv(package, reference_csv, device=device, events=events))
    else:
        reference = load_reference(package)
        if reference is None:
            raise DataError(
                f"{package_path} holds no training-data profile (packages from before MedTL 0.1 drift "
                "monitoring); give the training images with --reference train.csv"
            )
    new = _profile_csv(package, data_csv, device=device, events=events)
    result = compare_profiles(reference, new, alpha=alpha)
    for image, row in zip(result["images"], new["rows"], strict=True):
        image["row"] = row
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from medtl.report import json_safe

    atomic_write_text(out_dir / "drift.json", json.dumps(json_safe(result), indent=2) + "\n")
    drift_figure(out_dir / "drift.png", reference, new, result)
    return result
