"""The Slicer Extensions Index's rules that can run offline: the catalog entry (MedTL.json) against
the catalog schema's fields, the extension's name in every place it is spelled, the metadata the
index reads from CMakeLists.txt, the licence file, the icon, the self-tests' registration, and every
URL that points into this repository naming a file that exists."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[2]
CATALOG = REPO / "MedTL.json"
# Slicer's Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json: required keys and the type of
# every property it allows (additionalProperties is false).
REQUIRED = {"$schema", "category", "scm_url"}
PROPERTIES = {
    "$schema": str,
    "category": str,
    "scm_url": str,
    "scm_revision": str,
    "scm_type": str,
    "build_dependencies": list,
    "dicom_support_rule": str,
    "build_subdirectory": str,
    "enabled": bool,
    "tier": int,
}


def cmake_settings(path: Path) -> dict[str, str]:
    return dict(re.findall(r'^\s*set\((EXTENSION_\w+)\s+"([^"]*)"\)', path.read_text(), flags=re.MULTILINE))


@pytest.fixture(scope="module")
def entry() -> dict:
    return json.loads(CATALOG.read_text())


@pytest.fixture(scope="module")
def metadata() -> dict[str, str]:
    return cmake_settings(REPO / "CMakeLists.txt")


def repository(entry: dict) -> tuple[str, str]:
    owner, name = urlsplit(entry["scm_url"]).path.strip("/").removesuffix(".git").split("/")
    return owner, name


def test_catalog_entry_follows_the_schema(entry):
    assert REQUIRED <= set(entry), f"missing: {REQUIRED - set(entry)}"
    assert set(entry) <= set(PROPERTIES), f"not in the schema: {set(entry) - set(PROPERTIES)}"
    for key, value in entry.items():
        assert isinstance(value, PROPERTIES[key]), f"{key} must be a {PROPERTIES[key].__name__}"
    assert entry.get("scm_type", "git") in ("git", "local") and entry.get("scm_type") != "local"
    assert 1 <= entry.get("tier", 1) <= 5
    assert re.fullmatch(
        r"https://raw\.githubusercontent\.com/Slicer/Slicer/[^/]+/Schemas/"
        r"slicer-extension-catalog-entry-schema-v1\.\d+\.\d+\.json#",
        entry["$schema"],
    )
    assert urlsplit(entry["scm_url"]).scheme in ("https", "git") and entry["scm_url"].endswith(".git")
    assert entry.get("scm_revision"), "the index builds a named revision"
    assert all(isinstance(d, str) and d for d in entry.get("build_dependencies", []))
    assert (REPO / entry.get("build_subdirectory", ".") / "CMakeLists.txt").is_file()


def test_the_name_is_the_same_everywhere(entry, metadata):
    project = re.search(r"^project\((\w+)\)", (REPO / "CMakeLists.txt").read_text(), flags=re.MULTILINE)
    assert project and project.group(1) == CATALOG.stem == "MedTL"
    # The index asks that the repository's name says it is a Slicer extension.
    assert "slicer" in repository(entry)[1].lower()
    assert entry["category"] == metadata["EXTENSION_CATEGORY"]
    assert entry.get("build_dependencies", []) == metadata.get("EXTENSION_DEPENDS", "NA").split()


def test_cmake_metadata_the_index_reads(metadata):
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert metadata.get(f"EXTENSION_{key}", "").strip(), f"EXTENSION_{key} is empty"
    assert metadata["EXTENSION_HOMEPAGE"].startswith("https://")
    assert metadata["EXTENSION_ICONURL"].startswith("https://")
    assert all(url.startswith("http") for url in metadata["EXTENSION_SCREENSHOTURLS"].split())
    assert len(metadata["EXTENSION_DESCRIPTION"]) > 40


def test_a_licence_file_is_in_the_repository():
    licences = [p for p in REPO.iterdir() if p.name.upper().split(".")[0] in ("LICENSE", "LICENCE", "COPYING")]
    assert licences and "Apache License" in licences[0].read_text()[:500]


def test_the_icon_is_a_128_pixel_png(metadata):
    icon = repo_file(metadata["EXTENSION_ICONURL"], *repository(json.loads(CATALOG.read_text())))
    assert icon is not None
    head = (REPO / icon).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == (128, 128)


def repo_file(url: str, owner: str, name: str) -> str | None:
    """The repository path a URL into this repository names (None for other URLs)."""
    pattern = (
        rf"https://raw\.githubusercontent\.com/{owner}/{name}/(?P<rev>[^/]+)/(?P<path>.+)"
        rf"|https://github\.com/{owner}/{name}/(?:blob|raw|tree)/(?P<rev2>[^/]+)/(?P<path2>.+)"
    )
    match = re.fullmatch(pattern, url, flags=re.IGNORECASE)
    if match is None:
        return None
    return (match.group("path") or match.group("path2")).split("#")[0].split("?")[0]


def test_every_url_into_this_repository_names_a_file_that_exists(entry):
    owner, name = repository(entry)
    sources = [REPO / "CMakeLists.txt", CATALOG, REPO / "README.md", *REPO.glob("docs/**/*.md")]
    sources += [p for p in REPO.glob("*/*.py")] + [p for p in REPO.glob("*/CMakeLists.txt")]
    checked = []
    for source in sources:
        for url in re.findall(r"https?://[^\s\"'<>)\]]+", source.read_text(encoding="utf-8")):
            path = repo_file(url.rstrip(".,"), owner, name)
            if path is not None:
                checked.append(url)
                assert (REPO / path).exists(), f"{source.name}: {url} names {path}, which is not in the repository"
            if "raw.githubusercontent.com" in url and f"/{owner}/{name}/" in url:
                assert f"/{entry['scm_revision']}/" in url, f"{url} is not on the catalog's revision"
    assert len(checked) >= 2, "the icon and the screenshot point into the repository"


def test_self_tests_are_registered_and_not_collected_twice():
    registered = re.findall(
        r"slicer_add_python_unittest\(\s*SCRIPT\s+\$\{CMAKE_CURRENT_SOURCE_DIR\}/(\S+)\s*\)",
        (REPO / "Testing" / "CMakeLists.txt").read_text(),
    )
    scripts = sorted(p.relative_to(REPO / "Testing").as_posix() for p in (REPO / "Testing" / "Python").glob("*.py"))
    assert scripts and sorted(registered) == scripts
    assert "add_subdirectory(Testing)" in (REPO / "CMakeLists.txt").read_text()
    for script in scripts:
        text = (REPO / "Testing" / script).read_text()
        # A module Test class imported at the top would be found (and run) twice by runUnitTest.
        top_level = [line for line in text.splitlines() if line.startswith(("import ", "from "))]
        modules = ("MedTLExtension", "MedTLTraining")
        assert not any(line.split()[1].split(".")[0] in modules for line in top_level), script
        assert not Path(script).name.startswith("test_"), "pytest would collect it as well"
