"""The README's commands use only what the project provides (found by a new operator: it told
them to run `grpcurl`, which is only in the virtualenv, and `nc`, which a fresh Debian lacks),
and its walkthrough follows events with `--since 0`, so the Run's first events cannot be missed
whichever process the shell starts first."""

from __future__ import annotations

import re

from cocos_manager.cli.commands import ADDRESS_VARIABLE, TLS_VARIABLES
from cocos_manager.config.unknown import known_variables
from tests.support.readme import README, REPO


def shell_lines() -> list[str]:
    text = README.read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_grpcurl_is_named_where_make_install_puts_it() -> None:
    assert (REPO / ".venv" / "bin" / "grpcurl").exists(), "make install provides grpcurl"
    bare = [line for line in shell_lines() if re.match(r"\s*grpcurl\b", line)]
    assert bare == [], bare
    assert any(line.startswith(".venv/bin/grpcurl ") for line in shell_lines())


def test_no_netcat() -> None:
    assert not [line for line in shell_lines() if re.search(r"(^|[|;&]\s*)(nc|netcat) ", line)]


def test_the_walkthrough_follows_events_from_the_start() -> None:
    (line,) = [line for line in shell_lines() if "cocos-manager-cli events" in line and "&" in line]
    assert "--since 0" in line


def test_the_cli_variables_are_documented_and_known() -> None:
    text = README.read_text()
    for name in (ADDRESS_VARIABLE, *TLS_VARIABLES.values()):
        assert f"`{name}`" in text, name
        assert name in known_variables()
