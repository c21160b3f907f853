"""MANAGER_GRPC_TIMEOUT above 24.8 days (a valid Go duration such as 1000h) became gRPC's
`grpc.keepalive_timeout_ms` in milliseconds, beyond a C int: the channel could not be made,
the dial-out task died at its first attempt and never dialled, with no `dial-out retrying`
line (found in review)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.api.test_dialout import computations_server, dialing_manager, until


async def test_a_long_timeout_still_dials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with (
        computations_server(tmp_path) as server,
        dialing_manager(tmp_path, monkeypatch, server.url, MANAGER_GRPC_TIMEOUT="1000h") as (
            _,
            dialout,
            _,
        ),
    ):
        await until(lambda: dialout.connected, "connected")


@pytest.mark.parametrize("url", ["ipv4:127.0.0.1:7001", "ipv6:[::1]:7001"])
def test_own_server_in_grpc_address_schemes_is_refused(url: str) -> None:
    """gRPC's ipv4:/ipv6: targets name the daemon's own server as well as host:port does."""
    from cocos_manager.api.dialout import DialOutConfigError, dialout_config
    from cocos_manager.config.settings import ServiceSettings

    with pytest.raises(DialOutConfigError, match="MANAGER_GRPC_URL"):
        dialout_config(ServiceSettings(GRPC_URL=url))  # type: ignore[call-arg]


async def test_a_server_unreachable_from_the_start_is_said_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README promises `dial-out retrying` with the reason: it was logged only after a
    stream had been up, so a wrong MANAGER_GRPC_URL was never reported above debug."""
    from structlog.testing import capture_logs

    async with computations_server(tmp_path) as server:
        url = server.url  # nobody listens there any more
    with capture_logs() as logs:
        async with dialing_manager(tmp_path, monkeypatch, url) as (_, dialout, _):
            await until(lambda: dialout.attempts >= 3, "three attempts")
    retrying = [e for e in logs if e["event"] == "dial-out retrying"]
    assert len(retrying) == 1, [e["event"] for e in logs if e["log_level"] != "debug"]
    assert retrying[0]["log_level"] == "warning" and retrying[0]["error"]
