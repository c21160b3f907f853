"""The README's machine-checked parts: the env blocks marked `<!-- readme-env: NAME ... -->`."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
_EXPORT = re.compile(r"^export ((?:MANAGER|COCOS)_[A-Z0-9_]+)=(\S*)")


def env_block(name: str, pwd: Path = REPO) -> dict[str, str]:
    """The variables of the marked block, `$PWD` read as `pwd`, comments dropped."""
    text = README.read_text()
    marker = text.index(f"<!-- readme-env: {name}")
    fence = text.index("```sh\n", marker) + len("```sh\n")
    block = text[fence : text.index("```", fence)]
    env = {}
    for line in block.splitlines():
        match = _EXPORT.match(line)
        if match:
            env[match.group(1)] = match.group(2).replace("$PWD", str(pwd))
        else:
            assert not line.strip() or line.startswith("#"), f"not an export line: {line!r}"
    return env
