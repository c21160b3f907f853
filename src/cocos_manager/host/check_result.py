"""One finding of a host check (pass / warn / fail, naming the setting and the fix), and how a
list of them is printed and judged by `cocos-manager check`."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

Status = Literal["pass", "warn", "fail"]


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def render(checks: Iterable[Check], as_json: bool) -> str:
    checks = list(checks)
    if as_json:
        return json.dumps([c.as_dict() for c in checks], indent=2)
    width = max((len(c.name) for c in checks), default=0)
    return "\n".join(f"{c.status.upper():4}  {c.name:{width}}  {c.detail}" for c in checks)


def exit_code(checks: Iterable[Check]) -> int:
    """1 when a Run with these settings cannot work."""
    return 1 if any(c.status == "fail" for c in checks) else 0
