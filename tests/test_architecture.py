"""The package's shape (docs/architecture.md, "The wings"): imports point one way and are
enforced by import-linter; other wings are reached through their public names; sizes stay
readable. Each rule is checked on the real tree, and the linter is shown to catch a reversal."""

from __future__ import annotations

import ast
import importlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "cocos_manager"
LINT_IMPORTS = Path(os.environ.get("TOOLS_VENV", ROOT / ".venv-tools")) / "bin" / "lint-imports"
WINGS = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 300


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "proto" in path.relative_to(PACKAGE).parts[:1]:
            continue  # generated
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found.append((".".join(parts), path))
    return found


def wing_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in WINGS else module


def lint_imports(src: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=ROOT,
        env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_layers_hold_and_nothing_imports_in_a_circle() -> None:
    result = lint_imports(ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "reversed_import", "broken"),
    [
        ("config/settings.py", "import cocos_manager.service", "Wings import downwards only"),
        ("vm/start.py", "import cocos_manager.vm.machine", "No import circles"),
    ],
)
def test_a_reversed_import_fails_the_linter(
    tmp_path: Path, module: str, reversed_import: str, broken: str
) -> None:
    copy = tmp_path / "src" / "cocos_manager"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    target.write_text(target.read_text() + f"\n{reversed_import}\n")
    result = lint_imports(tmp_path / "src")
    assert result.returncode != 0, result.stdout
    assert f"{broken}" in result.stdout and "BROKEN" in result.stdout


def test_other_wings_are_reached_through_their_public_names() -> None:
    """`from cocos_manager.qemu import QemuProcess`, never `cocos_manager.qemu.process`: a
    wing's __init__ is its public face (mypy's no-implicit-reexport checks the names)."""
    offences = []
    for module, path in modules():
        if path.name == "__init__.py" and module.count(".") == 1:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "cocos_manager."
            ):
                target = node.module or ""
                into_wing = wing_of(target) in WINGS and target.count(".") >= 2
                if into_wing and wing_of(target) != wing_of(module) and wing_of(target) != "proto":
                    offences.append(f"{module}: from {target} import ...")
    assert offences == []


def test_no_private_name_is_imported_from_another_module() -> None:
    offences = [
        f"{module}: from {node.module} import {alias.name}"
        for module, path in modules()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module != "__future__"
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]
    assert offences == []


def test_every_wing_says_its_job_and_its_public_names() -> None:
    """HOMES (name -> module) is what loads a public name; the TYPE_CHECKING imports are what
    mypy sees: the two must name the same things, and every name must load."""
    for wing in WINGS:
        if wing in ("proto", "cli"):
            continue  # generated; a command, not a library for other wings
        package = importlib.import_module(f"cocos_manager.{wing}")
        tree = ast.parse((PACKAGE / wing / "__init__.py").read_text())
        assert ast.get_docstring(tree), f"{wing}/__init__.py has no docstring"
        typed = {
            (alias.asname or alias.name, (node.module or "").rsplit(".", 1)[-1])
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cocos_manager")
            for alias in node.names
        }
        assert typed == set(package.HOMES.items()), wing
        for name in package.HOMES:
            assert getattr(package, name) is not None


def test_no_module_is_named_for_its_wing_again() -> None:
    assert [
        module
        for module, _ in modules()
        if module.count(".") == 2
        and module.split(".")[2].startswith(module.split(".")[1].rstrip("s") + "_")
    ] == []


def test_modules_and_classes_stay_readable() -> None:
    long_modules = [
        f"{module}: {n} lines"
        for module, path in modules()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    long_classes = [
        f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for module, path in modules()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES
    ]
    assert long_modules == [] and long_classes == []


def test_no_public_name_is_also_a_module_of_its_wing() -> None:
    """Once a wing's module is imported it becomes the package's attribute of that name, and a
    public name spelled the same would then load the module, not the name."""
    clashes = [
        f"{wing}.{name}"
        for wing in WINGS
        if wing not in ("proto", "cli")
        for name in importlib.import_module(f"cocos_manager.{wing}").HOMES
        if (PACKAGE / wing / f"{name}.py").exists()
    ]
    assert clashes == []
