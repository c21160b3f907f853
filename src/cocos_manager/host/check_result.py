"""One finding of a host check (pass / info / warn / fail, naming the setting and the fix), and
how a list of them is printed and judged by `cocos-manager check`.

`info` is what the host offers or lacks for a feature the settings do not ask for (SEV on a
TCG host, TDX on AMD): worth knowing, never a warning, and never advice to set what is already
set. The text report hides it unless asked (`--verbose`); JSON always carries it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

Status = Literal["pass", "info", "warn", "fail"]


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def render(checks: Iterable[Check], as_json: bool, verbose: bool = False) -> str:
    checks = list(checks)
    if as_json:
        return json.dumps([c.as_dict() for c in checks], indent=2)
    shown = [c for c in checks if verbose or c.status != "info"]
    width = max((len(c.name) for c in shown), default=0)
    return "\n".join(f"{c.status.upper():4}  {c.name:{width}}  {c.detail}" for c in shown)


def hidden_note(checks: Iterable[Check], verbose: bool) -> str:
    """For stderr, so that stdout stays one check per line: how many info lines were left
    out, and how to see them ("" when none were)."""
    hidden = 0 if verbose else sum(1 for c in checks if c.status == "info")
    if not hidden:
        return ""
    return (
        f"{hidden} info line{'s' if hidden > 1 else ''} about features the settings do not ask "
        "for: --verbose shows them"
    )


def exit_code(checks: Iterable[Check]) -> int:
    """1 when a Run with these settings cannot work."""
    return 1 if any(c.status == "fail" for c in checks) else 0
