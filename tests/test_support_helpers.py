"""The suite's own rules hold: a missing prerequisite fails under CI, a wait names what never
happened, and the property-test seed comes from the commit unless one is given."""

from __future__ import annotations

import pytest

from tests.conftest import SEED_VARIABLE, property_seed
from tests.support.waiting import unavailable, wait_for


@pytest.mark.parametrize(("ci", "outcome"), [("true", "fail"), ("", "skip")])
def test_a_missing_prerequisite_fails_only_under_ci(
    monkeypatch: pytest.MonkeyPatch, ci: str, outcome: str
) -> None:
    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if outcome == "fail" else pytest.skip.Exception
    with pytest.raises(expected, match="needs root"):
        unavailable("needs root")


async def test_wait_for_names_what_never_happened() -> None:
    with pytest.raises(AssertionError, match="timed out waiting for the moon"):
        await wait_for(lambda: False, "the moon", within=0.02)
    await wait_for(lambda: True, "at once", within=0)


def test_the_seed_comes_from_the_commit_unless_given(
    monkeypatch: pytest.MonkeyPatch, pytestconfig: pytest.Config
) -> None:
    monkeypatch.setattr(pytestconfig.option, "hypothesis_seed", None)
    monkeypatch.delenv(SEED_VARIABLE, raising=False)
    seed, source = property_seed(pytestconfig)
    assert source == "the commit under test" and seed >= 0
    monkeypatch.setenv(SEED_VARIABLE, "1234")
    assert property_seed(pytestconfig) == (1234, SEED_VARIABLE)
    monkeypatch.setattr(pytestconfig.option, "hypothesis_seed", "99")
    assert property_seed(pytestconfig) == (99, "--hypothesis-seed")
