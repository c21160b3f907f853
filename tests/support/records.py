"""The VM records of a state directory as the daemon reads them: the newest version of each.

A new version is written under a new name and the one it replaces unlinked once the new one
is on the disk (state_store.py), so for a moment, or after a SIGKILL, two versions of one
record are there; the newest wins."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any


def newest_record_paths(state: Path) -> dict[str, Path]:
    """UUID -> the path of its newest version (vm-UUID.GENERATION.json)."""
    newest: dict[str, tuple[int, Path]] = {}
    for path in state.glob("vm-*.json"):
        uuid, _, generation = path.name.removeprefix("vm-").removesuffix(".json").rpartition(".")
        if generation.isdigit() and int(generation) > newest.get(uuid, (-1, path))[0]:
            newest[uuid] = (int(generation), path)
    return {uuid: path for uuid, (_, path) in sorted(newest.items())}


def newest_record_path(state: Path) -> Path:
    """The newest version of the one record there is (for a test that edits it)."""
    (path,) = newest_record_paths(state).values()
    return path


def newest_records(state: Path) -> list[dict[str, Any]]:
    """The newest version of each record, by UUID; one being superseded right now is read
    on the next call."""
    docs = []
    for path in newest_record_paths(state).values():
        with contextlib.suppress(FileNotFoundError, ValueError):
            docs.append(json.loads(path.read_text()))
    return docs
