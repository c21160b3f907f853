"""Finds MANAGER_* variables nothing reads, so a typo is reported instead of silently ignored."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cocos_manager.config.settings import QemuSettings, ServiceSettings, env_name

# Read elsewhere, not by these models: the dial-out client (MANAGER_GRPC_URL and its
# companions) and the variables the unit file or the CLI set.
EXTRA_KNOWN_VARIABLES = frozenset(
    {
        "MANAGER_GRPC_URL",
        "MANAGER_GRPC_TIMEOUT",
        "MANAGER_GRPC_CLIENT_CERT",
        "MANAGER_GRPC_CLIENT_KEY",
        "MANAGER_GRPC_ATTESTED_TLS",
        "MANAGER_GRPC_MANIFEST",
        # cocos-manager-cli's own (cli/commands.py): where the manager is, its TLS files.
        "COCOS_MANAGER_ADDR",
        "COCOS_MANAGER_CA",
        "COCOS_MANAGER_CERT",
        "COCOS_MANAGER_KEY",
    }
)


def known_variables() -> frozenset[str]:
    """Every MANAGER_* (and COCOS_*) variable something in the manager reads."""
    names = {
        env_name(model, field)
        for model in (ServiceSettings, QemuSettings)
        for field in model.model_fields
    }
    return frozenset(names | EXTRA_KNOWN_VARIABLES)


@dataclass(frozen=True, slots=True)
class UnknownVariable:
    name: str
    closest: str | None


def _close_matches(name: str, known: frozenset[str]) -> list[str]:
    import difflib  # only when there is a name to match: not on every start-up

    return difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)


def unknown_variables(environ: Mapping[str, str]) -> list[UnknownVariable]:
    """MANAGER_* variables nothing reads (a typo is otherwise silently ignored), each with
    the closest known name when one is close enough to be the likely intent."""
    known = known_variables()
    out = []
    for name in sorted(environ):
        if not name.upper().startswith("MANAGER_") or name in known:
            continue
        if name.upper() in known:  # names are case-sensitive, as in Go: said, not guessed
            out.append(UnknownVariable(name, name.upper()))
            continue
        # A name cut short (MANAGER_QEMU_MEMORY) most likely meant the shortest longer one.
        longer = sorted((k for k in known if k.startswith(name + "_")), key=len)
        close = longer or _close_matches(name, known)
        out.append(UnknownVariable(name, close[0] if close else None))
    return out
