"""`cocos-manager check`'s sudo line and a kill rule that wants a password.

`sudo -n -l /usr/bin/kill` lists the command for any rule that names it, NOPASSWD or not (sudo's
default listpw=any needs one NOPASSWD entry, the QEMU one, to list without a password): with
`cocos ALL=(root) /usr/bin/kill` check said pass, and Stop's `sudo -n kill -KILL` then failed
with "a password is required". The runner below answers as sudo 1.9.13 does for that rule
(measured with a system user and that sudoers file).
"""

from __future__ import annotations

import pytest

from cocos_manager.qemu.probes import check_sudo
from tests.host.test_host_check import settings


def sudo_with_kill_needing_a_password(argv: list[str]) -> str:
    if argv[-1] == "-version":
        return "QEMU emulator version 7.2.22\n"
    if "-l" in argv[:3]:  # `sudo -n -l CMD`: listed, whatever the rule's tag
        return f"{argv[-1]}\n"
    return "sudo: a password is required\n"


def test_a_kill_rule_that_wants_a_password_is_not_a_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = settings(monkeypatch, MANAGER_QEMU_USE_SUDO="true")
    check = check_sudo(s, sudo_with_kill_needing_a_password)
    assert check is not None
    assert check.status == "warn", check
    assert "kill" in check.detail
