"""Long fuzz runs of the manager's input parsers: what agents and operators can feed it.

    python scripts/fuzz.py [--examples N] [--target agent-frames|settings|manifest|all]

The test suite runs the same properties with a few hundred examples; this runs them with
100k+ so rare paths get hit before an agent or an environment file hits them. Each target is
a function in TARGETS that runs its properties and returns a one-line summary.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.* (the properties live with the tests)

from cocos_manager.config.go_parse import (  # noqa: E402
    parse_go_bool,
    parse_go_duration,
    parse_go_int,
    parse_port_range,
)
from cocos_manager.config.settings import (  # noqa: E402
    QemuSettings,
    Settings,
    SettingsError,
    load_settings,
)


def _run(
    check: Callable[..., None], strategies: tuple[SearchStrategy[Any], ...], examples: int
) -> int:
    """Runs one property; returns how many inputs it saw (shrinking replays included)."""
    calls = 0

    @functools.wraps(check)  # given() reads the parameters through __wrapped__
    def counted(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        check(*args, **kwargs)

    config = settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )
    test: Callable[[], None] = config(given(*strategies)(counted))
    test()
    return calls


# -- agent frames -----------------------------------------------------------------------------


def fuzz_agent_frames(examples: int) -> str:
    from tests.agent.test_fuzz_agent_frames import PROPERTIES

    calls = 0
    for check, strategies in PROPERTIES.values():
        calls += _run(check, strategies, examples)
    return f"{len(PROPERTIES)} properties, {calls} inputs"


# -- settings ---------------------------------------------------------------------------------

_PARSERS: dict[Callable[[object], object], str] = {
    parse_go_bool: "bool",
    parse_go_int: "int",
    parse_go_duration: "duration",
    parse_port_range: "port-range",
}


def _typed_variables() -> dict[str, str]:
    """MANAGER_QEMU_* variables that are parsed (not taken as text), with their kind."""
    found: dict[str, str] = {}
    for field, info in QemuSettings.model_fields.items():
        for meta in info.metadata:
            kind = _PARSERS.get(getattr(meta, "func", None))  # type: ignore[arg-type]
            if kind:
                found[f"MANAGER_QEMU_{field}"] = kind
    found["MANAGER_QEMU_AGENT_CHANNEL"] = "enum"
    return found


VARIABLES = _typed_variables()

_near_valid = st.sampled_from(
    [
        *("1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false", "False"),
        *("yes", "no", "on", "off", "tRuE", " true", "true ", "1.0", "01", "+1", "-0"),
        *("2147483647", "2147483648", "-2147483648", "-2147483649", "0x10", "1e3", "1_000"),
        *("\u0661\u0662", "\uff11\uff12", "  5", "5\n", "", "-", "+", "99999999999999999999999999"),
        *("30s", "1m30s", "250ms", "-1s", ".5s", "1h2m", "5", "1.5h", "µs", "3µs"),
        *("6100-6200", "0-1", "1-65535", "65536-1", "200-100", "vsock", "fw_cfg", "VSOCK"),
    ]
)
_env_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
    max_size=30,
)
env_values = _near_valid | _env_text | st.integers(-(2**40), 2**40).map(str)
env_assignments = st.dictionaries(
    st.sampled_from(sorted(VARIABLES)), env_values, min_size=1, max_size=4
)

_GO_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_GO_FALSE = {"0", "f", "F", "FALSE", "false", "False"}
_GO_INT = re.compile(r"[+-]?[0-9]+")  # strconv.ParseInt(v, 10, 32): ASCII digits only


def _clear_environment() -> None:
    for name in list(os.environ):
        if name.startswith(("MANAGER_", "COCOS_")):
            del os.environ[name]


def _load(assignments: dict[str, str]) -> Settings | SettingsError:
    _clear_environment()
    os.environ.update(assignments)
    try:
        return load_settings()
    except SettingsError as error:
        return error
    finally:
        _clear_environment()


def _expected(kind: str, value: str) -> object:
    """What the original (Go strconv) makes of a value that loaded; None = no oracle."""
    if kind == "bool":
        assert value in _GO_TRUE | _GO_FALSE, value
        return value in _GO_TRUE
    if kind == "int":
        assert _GO_INT.fullmatch(value) and -(2**31) <= int(value) < 2**31, value
        return int(value)
    return None


def check_settings_environment(assignments: dict[str, str]) -> None:
    """Loads as the original would, or names a variable that is bad on its own; never any
    other exception."""
    loaded = _load(assignments)
    if isinstance(loaded, Settings):
        for name, value in assignments.items():
            expected = _expected(VARIABLES[name], value) if value else None
            if expected is not None:
                got = getattr(loaded.qemu, name.removeprefix("MANAGER_QEMU_"))
                assert got == expected and type(got) is type(expected), (name, value, got)
        return
    message = str(loaded)
    named = [name for name in assignments if f"{name}:" in message or f"{name} " in message]
    assert named, f"SettingsError names none of {sorted(assignments)}: {message}"
    for name in named:
        alone = _load({name: assignments[name]})
        assert isinstance(alone, SettingsError) and name in str(alone), (name, message)


def fuzz_settings(examples: int) -> str:
    calls = _run(check_settings_environment, (env_assignments,), examples)
    return f"{len(VARIABLES)} variables, {calls} environments"


# -- manifest ---------------------------------------------------------------------------------


def fuzz_manifest(examples: int) -> str:
    """Run request validation and manifest JSON: the properties of tests/agent/test_fuzz_manifest.py."""
    from tests.agent.test_fuzz_manifest import PROPERTIES

    calls = 0
    for check, strategies in PROPERTIES.values():
        calls += _run(check, strategies, examples)
    return f"{len(PROPERTIES)} properties, {calls} requests"


TARGETS: dict[str, Callable[[int], str]] = {
    "agent-frames": fuzz_agent_frames,
    "settings": fuzz_settings,
    "manifest": fuzz_manifest,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100_000, help="examples per property")
    parser.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    args = parser.parse_args(argv)
    chosen = list(TARGETS) if args.target == "all" else [args.target]
    failed = 0
    for name in chosen:
        started = time.monotonic()
        try:
            summary = TARGETS[name](args.examples)
        except Exception as error:
            failed += 1
            elapsed = time.monotonic() - started
            print(f"{name}: FAILED after {elapsed:.1f} s: {type(error).__name__}: {error}")
            continue
        print(f"{name}: ok, {summary}, {time.monotonic() - started:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
