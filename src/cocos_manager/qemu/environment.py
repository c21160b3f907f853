"""The environment QEMU is started with: a small explicit set, never the daemon's own.

The daemon's environment holds secrets (a TLS key given as PEM text in
MANAGER_GRPC_SERVER_KEY, collector credentials...) that anyone who can read
/proc/<qemu>/environ would see, and QEMU needs none of them. It gets what a program needs to
find its helpers and speak the host's locale, plus the names an operator lists in
MANAGER_QEMU_PASS_ENV (e.g. a library path for a self-built QEMU).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from cocos_manager.config import QemuSettings

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

PASSED_NAMES = ("PATH", "LANG", "LANGUAGE", "TZ", "TMPDIR", "XDG_RUNTIME_DIR")
"""Passed when the daemon has them: PATH (QEMU runs helpers such as the bridge helper, and
sudo looks it up), the locale (messages QEMU prints reach the log), TZ (its timestamps),
TMPDIR (where QEMU makes temporary files) and XDG_RUNTIME_DIR (some display and audio
back-ends look there). HOME is left out: QEMU reads nothing from it."""

PASSED_PREFIXES = ("LC_",)


def qemu_environment(
    settings: QemuSettings, environ: Mapping[str, str] = os.environ
) -> dict[str, str]:
    """The environment for QEMU's exec: PASSED_NAMES, LC_*, and settings.PASS_ENV, each only
    when set in `environ`; PATH falls back to DEFAULT_PATH, since an exec without one would
    make sudo and QEMU's helpers unfindable."""
    env = {
        name: value
        for name, value in environ.items()
        if name in PASSED_NAMES or name.startswith(PASSED_PREFIXES) or name in settings.PASS_ENV
    }
    env.setdefault("PATH", DEFAULT_PATH)
    return env
