"""Static consistency of the Slicer modules: .ui files, parameter nodes, widget names, CMake lists.

Slicer is not available here, so nothing is imported: the module files are parsed with ``ast``,
the Qt Designer files with ``xml.etree`` and the CMakeLists with a few regular expressions. What
is checked, for each module:

(a) every ``SlicerParameterName`` in the .ui names a field of the module's
    ``@parameterNodeWrapper`` class (a typo there silently leaves a widget unbound);
(b) every parameter node field is bound by some widget (else the GUI cannot set it);
(c) every ``self.ui.<name>`` in the module file is a widget of the .ui (else an
    AttributeError at runtime, only on the code path that uses it);
(d) every .py file in the module folder is built: listed in, or globbed by, the module's
    CMakeLists (else it works from the source tree but is missing from the installed
    extension);
(e) every resource the CMakeLists lists exists;
(f) every ``self.ui.<name>`` in the shared widget lifecycle (``MedTLExtensionLib/widget_lifecycle.py``,
    inherited by both module widgets) is a widget of each module's .ui;
(g) the module files share code through the library only: neither imports the other module's file,
    and the Slicer-side library imports no Qt (``qt``, ``ctk``), so that it runs headless.
"""

from __future__ import annotations

import ast
import fnmatch
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ModuleSpec:
    """Where one scripted module keeps its parts."""

    name: str
    root: Path = REPO

    @property
    def folder(self) -> Path:
        return self.root / self.name

    @property
    def script(self) -> Path:
        return self.folder / f"{self.name}.py"

    @property
    def ui(self) -> Path:
        return self.folder / "Resources" / "UI" / f"{self.name}.ui"

    @property
    def cmake(self) -> Path:
        return self.folder / "CMakeLists.txt"


MODULES = [ModuleSpec("MedTLExtension"), ModuleSpec("MedTLTraining")]
LIBRARY = REPO / "MedTLExtension" / "MedTLExtensionLib"
SHARED_LIFECYCLE = LIBRARY / "widget_lifecycle.py"


# --------------------------------------------------------------------------- parsers


@dataclass(frozen=True)
class UiInfo:
    widgets: frozenset[str]
    bindings: dict[str, str]  # widget objectName -> SlicerParameterName


def parse_ui(text: str) -> UiInfo:
    """Widget names and parameter bindings of a Qt Designer file."""
    root = ET.fromstring(text)
    widgets: set[str] = set()
    bindings: dict[str, str] = {}
    for widget in root.iter("widget"):
        name = widget.get("name")
        if not name:
            continue
        widgets.add(name)
        # Only the widget's own properties: nested widgets carry their own.
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                value = prop.findtext("string")
                bindings[name] = (value or "").strip()
    return UiInfo(frozenset(widgets), bindings)


def parameter_node_fields(source: str) -> tuple[str, list[str]]:
    """Name and annotated fields of the ``@parameterNodeWrapper`` class in a module's source."""
    tree = ast.parse(source)
    classes = [
        node
        for node in tree.body
        if isinstance(node, ast.ClassDef)
        and any(_decorator_name(d) == "parameterNodeWrapper" for d in node.decorator_list)
    ]
    if len(classes) != 1:
        raise AssertionError(f"expected one @parameterNodeWrapper class, found {len(classes)}")
    cls = classes[0]
    fields = [
        stmt.target.id for stmt in cls.body if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
    ]
    return cls.name, fields


def _decorator_name(node: ast.expr) -> str:
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return ""


def ui_names_used(source: str) -> dict[str, int]:
    """``self.ui.<name>`` attributes in a module's source, with the first line using each."""
    used: dict[str, int] = {}
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            used.setdefault(node.attr, node.lineno)
    return used


_COMMAND = re.compile(r"^\s*(\w+)\s*\((.*?)\)", re.MULTILINE | re.DOTALL)


def cmake_lists(text: str, source_dir: Path) -> dict[str, list[str]]:
    """Evaluates the ``set()`` and ``file(GLOB[_RECURSE])`` commands of a module CMakeLists.

    This is only as much CMake as a module CMakeLists uses: variables, lists, globs relative to
    the source directory. Glob results are paths relative to ``source_dir``.
    """
    text = re.sub(r"#[^\n]*", "", text)
    variables: dict[str, list[str]] = {"CMAKE_CURRENT_SOURCE_DIR": [str(source_dir)]}

    def expand(token: str) -> list[str]:
        whole = re.fullmatch(r"\$\{(\w+)\}", token)
        if whole:
            return list(variables.get(whole.group(1), []))
        return [re.sub(r"\$\{(\w+)\}", lambda m: ";".join(variables.get(m.group(1), [])), token)]

    for match in _COMMAND.finditer(text):
        command = match.group(1).lower()
        args = [item for token in match.group(2).split() for item in expand(token)]
        if command == "set" and args:
            variables[args[0]] = args[1:]
        elif command == "file" and args and args[0] in ("GLOB", "GLOB_RECURSE"):
            recursive = args[0] == "GLOB_RECURSE"
            var, rest = args[1], args[2:]
            relative = None
            patterns: list[str] = []
            i = 0
            while i < len(rest):
                if rest[i] == "RELATIVE":
                    relative = Path(rest[i + 1])
                    i += 2
                    continue
                if rest[i] not in ("CONFIGURE_DEPENDS", "LIST_DIRECTORIES", "FOLLOW_SYMLINKS"):
                    patterns.append(rest[i])
                i += 1
            found: list[str] = []
            for pattern in patterns:
                base = Path(pattern).parent
                if not base.is_absolute():
                    base = source_dir / base
                name = Path(pattern).name
                candidates = base.rglob("*") if recursive else base.glob("*")
                for path in sorted(candidates):
                    if path.is_file() and fnmatch.fnmatch(path.name, name) and "__pycache__" not in path.parts:
                        found.append(path.relative_to(relative or source_dir).as_posix())
            variables[var] = found
    return variables


def imported_modules(source: str) -> dict[str, int]:
    """Top-level names of the modules a source imports (at any depth), with the first line of each."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            found.setdefault(name.split(".")[0], node.lineno)
    return found


def python_files(folder: Path) -> list[str]:
    return sorted(
        path.relative_to(folder).as_posix() for path in folder.rglob("*.py") if "__pycache__" not in path.parts
    )


def package_data_files(folder: Path) -> list[str]:
    """Files other than Python inside the module's Python packages (templates the code loads)."""
    packages = {path.parent for path in folder.rglob("__init__.py")}
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file()
        and path.suffix not in (".py", ".pyc")
        and "__pycache__" not in path.parts
        and any(package in path.parents for package in packages)
    )


# --------------------------------------------------------------------------- checks


def binding_problems(module: str, ui: UiInfo, class_name: str, fields: list[str]) -> list[str]:
    """(a) and (b): bindings in the .ui against the parameter node's fields."""
    problems = [
        f"{module}: widget '{widget}' has SlicerParameterName '{field}', which is not a field of "
        f"{class_name} (fields: {', '.join(fields)})"
        for widget, field in sorted(ui.bindings.items())
        if field not in fields
    ]
    bound = set(ui.bindings.values())
    problems += [
        f"{module}: parameter node field '{field}' of {class_name} is bound by no widget in the .ui "
        f"(add a widget with SlicerParameterName '{field}')"
        for field in fields
        if field not in bound
    ]
    return problems


def widget_name_problems(module: str, ui: UiInfo, used: dict[str, int]) -> list[str]:
    """(c): ``self.ui.<name>`` in the code against the .ui's widget names."""
    return [
        f"{module}: {module}.py line {line} uses self.ui.{name}, but the .ui has no widget '{name}'"
        for name, line in sorted(used.items())
        if name not in ui.widgets
    ]


def build_list_problems(module: ModuleSpec) -> list[str]:
    """(d) and (e): the CMakeLists against the files in the module folder."""
    variables = cmake_lists(module.cmake.read_text(encoding="utf-8"), module.folder)
    scripts = set(variables.get("MODULE_PYTHON_SCRIPTS", []))
    resources = variables.get("MODULE_PYTHON_RESOURCES", [])
    problems = [
        f"{module.name}: {path} is not in MODULE_PYTHON_SCRIPTS of {module.name}/CMakeLists.txt "
        "(list it, or extend a glob), so Slicer would not install it"
        for path in python_files(module.folder)
        if path not in scripts
    ]
    problems += [
        f"{module.name}: {path} is read by the code beside its modules but is not in MODULE_PYTHON_RESOURCES of "
        f"{module.name}/CMakeLists.txt, so Slicer would not install it"
        for path in package_data_files(module.folder)
        if path not in resources
    ]
    problems += [
        f"{module.name}: resource {path} listed in {module.name}/CMakeLists.txt does not exist"
        for path in resources
        if not (module.folder / path).is_file()
    ]
    return problems


# --------------------------------------------------------------------------- tests


@pytest.fixture(params=MODULES, ids=lambda m: m.name)
def module(request: pytest.FixtureRequest) -> ModuleSpec:
    return request.param


def test_module_files_exist(module: ModuleSpec) -> None:
    for path in (module.script, module.ui, module.cmake):
        assert path.is_file(), f"{module.name}: missing {path.relative_to(REPO)}"


def test_parameter_bindings_match_fields(module: ModuleSpec) -> None:
    ui = parse_ui(module.ui.read_text(encoding="utf-8"))
    class_name, fields = parameter_node_fields(module.script.read_text(encoding="utf-8"))
    assert fields, f"{module.name}: {class_name} has no fields"
    problems = binding_problems(module.name, ui, class_name, fields)
    assert not problems, "\n".join(problems)


def test_widgets_used_in_code_exist(module: ModuleSpec) -> None:
    ui = parse_ui(module.ui.read_text(encoding="utf-8"))
    used = ui_names_used(module.script.read_text(encoding="utf-8"))
    assert used, f"{module.name}: no self.ui.<widget> found; is the .ui loaded?"
    problems = widget_name_problems(module.name, ui, used)
    assert not problems, "\n".join(problems)


def test_cmake_builds_every_python_file(module: ModuleSpec) -> None:
    problems = build_list_problems(module)
    assert not problems, "\n".join(problems)


def test_shared_lifecycle_widgets_exist(module: ModuleSpec) -> None:
    ui = parse_ui(module.ui.read_text(encoding="utf-8"))
    used = ui_names_used(SHARED_LIFECYCLE.read_text(encoding="utf-8"))
    assert used, "widget_lifecycle.py uses no self.ui.<widget>; is this check still reading the right file?"
    problems = widget_name_problems(module.name, ui, used)
    assert not problems, "\n".join(p.replace(f"{module.name}.py", SHARED_LIFECYCLE.name) for p in problems)


def test_modules_share_code_through_the_library_only(module: ModuleSpec) -> None:
    imports = imported_modules(module.script.read_text(encoding="utf-8"))
    others = [m.name for m in MODULES if m.name != module.name and m.name in imports]
    assert not others, (
        f"{module.name}.py imports {others} (line {imports[others[0]]}): what both modules use belongs in "
        "MedTLExtensionLib"
    )


def test_library_imports_no_qt() -> None:
    problems = [
        f"{path.relative_to(REPO)} line {line} imports {name}"
        for path in sorted(LIBRARY.glob("*.py"))
        for name, line in imported_modules(path.read_text(encoding="utf-8")).items()
        if name in ("qt", "ctk")
    ]
    assert not problems, "the Slicer-side library must run without Qt:\n" + "\n".join(problems)


def test_mrml_selectors_get_the_scene(module: ModuleSpec) -> None:
    # A qMRMLNodeComboBox without the mrmlSceneChanged connection stays empty in Slicer.
    root = ET.fromstring(module.ui.read_text(encoding="utf-8"))
    top = root.find("widget")
    assert top is not None and top.get("class") == "qMRMLWidget", f"{module.name}: root is not a qMRMLWidget"
    receivers = {
        c.findtext("receiver")
        for c in root.iter("connection")
        if c.findtext("sender") == top.get("name") and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
    }
    for widget in root.iter("widget"):
        if widget.get("class") == "qMRMLNodeComboBox":
            assert widget.get("name") in receivers, (
                f"{module.name}: node selector '{widget.get('name')}' is not connected to mrmlSceneChanged"
            )


# ---------------------------------------------------------------- the checker can fail

_BAD_UI = """<?xml version="1.0" encoding="UTF-8"?>
<ui version="4.0">
 <widget class="qMRMLWidget" name="Bad">
  <layout class="QVBoxLayout" name="layout">
   <item>
    <widget class="QSpinBox" name="epochsSpinBox">
     <property name="SlicerParameterName" stdset="0"><string>epoch</string></property>
    </widget>
   </item>
  </layout>
 </widget>
</ui>
"""

_BAD_MODULE = """
from slicer.parameterNodeWrapper import parameterNodeWrapper

@parameterNodeWrapper
class BadParameterNode:
    epochs: int
    device: str

class BadWidget:
    def setup(self):
        self.ui.epochsSpinBox.value = 3
        self.ui.startButton.enabled = True
"""


def test_checker_reports_inconsistent_ui() -> None:
    ui = parse_ui(_BAD_UI)
    class_name, fields = parameter_node_fields(_BAD_MODULE)
    problems = binding_problems("Bad", ui, class_name, fields)
    problems += widget_name_problems("Bad", ui, ui_names_used(_BAD_MODULE))
    text = "\n".join(problems)
    # (a) the misspelt binding, naming widget and field
    assert "widget 'epochsSpinBox' has SlicerParameterName 'epoch'" in text
    # (b) both fields are unbound
    assert "field 'epochs' of BadParameterNode is bound by no widget" in text
    assert "field 'device' of BadParameterNode is bound by no widget" in text
    # (c) a button used in code but absent from the .ui
    assert "uses self.ui.startButton, but the .ui has no widget 'startButton'" in text
    assert len(problems) == 4, text


def test_import_checker_sees_nested_imports() -> None:
    source = "import os\ndef f():\n    import MedTLExtension\n    from qt import QTimer\n"
    assert imported_modules(source) == {"os": 1, "MedTLExtension": 3, "qt": 4}


def test_checker_reports_unbuilt_python_file(tmp_path: Path) -> None:
    folder = tmp_path / "Mod"
    (folder / "ModLib").mkdir(parents=True)
    (folder / "engine" / "sub").mkdir(parents=True)
    for rel in ("Mod.py", "ModLib/__init__.py", "ModLib/forgotten.py", "engine/a.py", "engine/sub/b.py"):
        (folder / rel).write_text("", encoding="utf-8")
    (folder / "CMakeLists.txt").write_text(
        "set(MODULE_NAME Mod)\n"
        "file(GLOB_RECURSE ENGINE RELATIVE ${CMAKE_CURRENT_SOURCE_DIR} CONFIGURE_DEPENDS\n"
        "  ${CMAKE_CURRENT_SOURCE_DIR}/engine/*.py)\n"
        "set(MODULE_PYTHON_SCRIPTS\n  ${MODULE_NAME}.py  # the module\n  ${MODULE_NAME}Lib/__init__.py\n"
        "  ${ENGINE}\n  )\n"
        "set(MODULE_PYTHON_RESOURCES Resources/Icons/${MODULE_NAME}.png)\n",
        encoding="utf-8",
    )
    problems = build_list_problems(ModuleSpec("Mod", root=tmp_path))
    text = "\n".join(problems)
    assert "ModLib/forgotten.py is not in MODULE_PYTHON_SCRIPTS" in text
    assert "resource Resources/Icons/Mod.png" in text
    assert "engine/sub/b.py" not in text, "a file matched by GLOB_RECURSE was reported"
    assert len(problems) == 2, text
