"""docs/architecture.md names methods as `Class.method`: files moved to stay under 400 lines
(vm/output.py, qemu/spawn.py) must not leave the map naming a method that is gone."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import cocos_manager

ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def project_classes() -> dict[str, type]:
    classes: dict[str, type] = {}
    for info in pkgutil.walk_packages(cocos_manager.__path__, "cocos_manager."):
        if info.name.endswith("__main__") or info.name.startswith("cocos_manager.proto"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and obj.__module__ == module.__name__:
                classes.setdefault(name, obj)
    return classes


def has_member(cls: type, name: str) -> bool:
    if hasattr(cls, name) or name in getattr(cls, "__annotations__", {}):
        return True
    return f"self.{name} " in inspect.getsource(cls) or f"self.{name}:" in inspect.getsource(cls)


def test_every_class_member_the_architecture_map_names_exists() -> None:
    classes = project_classes()
    named = re.findall(r"\b([A-Z][A-Za-z0-9]*)\.(_?[a-z][A-Za-z0-9_]*)\b", ARCHITECTURE.read_text())
    missing = sorted(
        {f"{cls}.{member}" for cls, member in named if cls in classes}
        - {
            f"{cls}.{member}"
            for cls, member in named
            if cls in classes and has_member(classes[cls], member)
        }
    )
    assert missing == [], f"docs/architecture.md names members that do not exist: {missing}"
