"""The suite's own rules hold: a missing prerequisite fails under CI, a wait names what never
happened, the property-test seed comes from the commit unless one is given, and a daemon the
tests start is the one they drive."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import HealthServicer

from cocos_manager.proto import manager_pb2 as pb
from tests.conftest import SEED_VARIABLE, property_seed
from tests.support.daemon_process import Daemon, listens_on
from tests.support.harness import base_env
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


async def test_a_daemon_whose_port_another_server_took_is_started_on_another(
    tmp_path: Path,
) -> None:
    """A port picked free and let go was taken by another test's daemon before this one
    bound it: the health check answered SERVING for the other daemon, and the test drove it
    (it listed another test's computation, "target"). The helper now checks that the port is
    its daemon's, and picks another when it is not."""
    other = grpc.aio.server()
    health = HealthServicer()
    health.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, other)
    taken = other.add_insecure_port("127.0.0.1:0")
    await other.start()
    daemon = Daemon(env=base_env(tmp_path), log=tmp_path / "daemon.log", port=taken)
    try:
        await daemon.start()
        assert daemon.port != taken
        assert listens_on(daemon.pid, daemon.port)
        listed = await daemon.stub.List(pb.ListRequest())
        assert list(listed.computations) == []
    finally:
        await daemon.terminate()
        await other.stop(None)
