"""The unit makes the state and per-VM directories itself (RuntimeDirectory=, StateDirectory=),
and systemd's default mode for them is 0755, not the 0700 the README promises for
MANAGER_QEMU_TMP_FILE_LOC (the daemon's own mkdir(0700) does not change a directory that
exists): other users could list the VMs' files and read world-readable image links (found in
review)."""

from __future__ import annotations

from tests.test_systemd_unit import _values


def test_directories_the_unit_makes_are_private() -> None:
    assert _values("RuntimeDirectoryMode") == ["0700"]
    assert _values("StateDirectoryMode") == ["0700"]
