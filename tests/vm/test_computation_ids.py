"""Computation ids reach operators' terminals (`cocos-manager-cli list`, logs, journal lines):
C0 controls and DEL were refused, but not the C1 controls U+0080-U+009F, among them U+009B,
the one-character CSI that `events` itself strips as an escape (found in review)."""

from __future__ import annotations

import pytest

from cocos_manager.agent.manifest import validate_run_request
from cocos_manager.errors import InvalidArgumentError
from tests.support.harness import run_request


@pytest.mark.parametrize("bad", ["a\x9b2Jb", "a\x85b", "a\x80"])
def test_c1_controls_in_an_id_are_refused(bad: str) -> None:
    with pytest.raises(InvalidArgumentError, match="id: control characters"):
        validate_run_request(run_request(bad))


def test_other_unicode_in_an_id_is_fine() -> None:
    validate_run_request(run_request("rechnung-ä-π-計算"))
