"""The README's table of every setting (name, default, what it does), generated from the
settings models so it cannot drift: `make settings-table` rewrites it between its markers,
and `tests/test_settings_table.py` fails when the README's copy differs from what this
module makes, or when a setting has no text (settings_help.py or a Field description).

    python -m cocos_manager.config.settings_table README.md           # rewrite the table
    python -m cocos_manager.config.settings_table --check README.md   # exit 1 when stale
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from enum import Enum
from pathlib import Path

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from cocos_manager.config.settings import QemuSettings, ServiceSettings, env_name
from cocos_manager.config.settings_help import DEFAULT_TEXT, HELP

BEGIN = (
    "<!-- settings-table: generated from src/cocos_manager/config/settings.py and "
    "settings_help.py by `make settings-table`; edit those, not this table -->"
)
END = "<!-- /settings-table -->"
MODELS: tuple[type[BaseSettings], ...] = (ServiceSettings, QemuSettings)


class MissingHelpError(Exception):
    """A setting without a line of text: the table would have a hole."""


def go_duration(seconds: float) -> str:
    """Seconds as the Go duration an operator would write: 30s, 60s, 1h, 2m30s, 250ms, 0s."""
    if seconds == 0:
        return "0s"
    if seconds < 120 and seconds == int(seconds):
        return f"{int(seconds)}s"
    millis = round(seconds * 1000)
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else ""]
    if millis and not (hours or minutes or secs):
        parts.append(f"{millis}ms")
    elif secs or millis:
        parts.append(f"{secs}.{millis:03d}".rstrip("0").rstrip(".") + "s")
    return "".join(parts)


def _is_duration(info: FieldInfo) -> bool:
    # Every float setting is a duration in seconds, written as a Go duration.
    return info.annotation in (float, float | None)


def default_text(name: str, info: FieldInfo) -> str:
    if name in DEFAULT_TEXT:
        return DEFAULT_TEXT[name]
    value = info.default
    if value is None or value == ():
        return "(none)"
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, Enum):
        text = str(value.value)
    elif isinstance(value, float) and _is_duration(info):
        text = go_duration(value)
    else:
        text = str(value)
    return f"`{text}`" if text else "(empty)"


def rows() -> Iterator[tuple[str, str, str]]:
    """(variable, default, what it does) for every field of every settings model."""
    missing = []
    for model in MODELS:
        for field, info in model.model_fields.items():
            name = env_name(model, field)
            text = HELP.get(name) or info.description
            if not text:
                missing.append(name)
                continue
            yield name, default_text(name, info), text
    if missing:
        raise MissingHelpError(
            f"no text for {', '.join(missing)}: add a line to "
            "src/cocos_manager/config/settings_help.py (or a Field description), then run "
            "`make settings-table`"
        )


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    lines = [BEGIN, "", "| variable | default | what it does |", "|---|---|---|"]
    lines += [f"| `{n}` | {_cell(d)} | {_cell(h)} |" for n, d, h in rows()]
    return "\n".join([*lines, "", END])


def updated(readme: str) -> str:
    """The README with its table replaced by a fresh one."""
    try:
        start = readme.index(BEGIN)
        end = readme.index(END, start) + len(END)
    except ValueError:
        raise MissingHelpError(f"the README has no {BEGIN!r} ... {END!r} markers") from None
    return readme[:start] + render() + readme[end:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("readme", type=Path)
    parser.add_argument("--check", action="store_true", help="exit 1 when the table is stale")
    options = parser.parse_args(argv)
    text = options.readme.read_text()
    try:
        fresh = updated(text)
    except MissingHelpError as error:
        print(f"settings-table: {error}", file=sys.stderr)
        return 1
    if options.check:
        if fresh != text:
            print(f"settings-table: {options.readme} is stale: run `make settings-table`")
            return 1
        return 0
    if fresh != text:
        options.readme.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
