"""Shared fixtures. Every test starts from an environment without MANAGER_*/COCOS_* variables."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith(("MANAGER_", "COCOS_")):
            monkeypatch.delenv(name)
    yield
