"""Property tests of Run request validation and manifest building: whatever a client sends, the
manager either refuses it with an InvalidArgumentError naming a field that is really wrong, or
builds the manifest JSON the agent reads exactly as docs/contracts.md ("The manifest") lays it out, byte for byte
what the Go original's encoding/json wrote.

The properties are plain functions with their strategies in PROPERTIES, so scripts/fuzz.py
runs the very same checks with hundreds of thousands of examples
(`python scripts/fuzz.py --target manifest --examples 100000`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from cocos_manager.agent.manifest import (
    HASH_SIZE,
    MAX_ID_LENGTH,
    build_manifest,
    manifest_json,
    validate_run_request,
)
from cocos_manager.errors import InvalidArgumentError
from cocos_manager.proto import manager_pb2 as pb

TEST_SETTINGS = settings(max_examples=250, deadline=None)

# -- an independent reading of the manifest contract --------------------------------------------


def violations(request: pb.ComputationRunReq) -> set[str]:
    """Every field of the request that makes it a bad request."""
    bad = set()
    if (
        not request.id
        or len(request.id) > MAX_ID_LENGTH
        or any(ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F for ch in request.id)
    ):
        bad.add("id")
    if not request.HasField("algorithm"):
        bad.add("algorithm")
    elif len(request.algorithm.hash) != HASH_SIZE:
        bad.add("algorithm.hash")
    if not request.HasField("agent_config"):
        bad.add("agent_config")
    elif (port := request.agent_config.port) and not (
        port.isascii() and port.isdigit() and 1 <= int(port) <= 65535
    ):
        bad.add("agent_config.port")
    for index, dataset in enumerate(request.datasets):
        if len(dataset.hash) != HASH_SIZE:
            bad.add(f"datasets[{index}].hash")
    if request.ttl and not 0 < _go_seconds(request.ttl) <= GO_MAX_SECONDS:
        bad.add("ttl")
    return bad


# Go's time.ParseDuration: a sign, then "0" or number-unit pairs; ASCII digits only.
_GO_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_GO_UNIT = r"(?:ns|us|\u00b5s|\u03bcs|ms|s|m|h)"
_GO_DURATION = re.compile(rf"[-+]?(?:0|(?:{_GO_NUMBER}{_GO_UNIT})+)")
_GO_PAIR = re.compile(rf"({_GO_NUMBER})({_GO_UNIT})")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3}
_GO_UNITS |= {"s": 1.0, "m": 60.0, "h": 3600.0}
GO_MAX_SECONDS = 2562047 * 3600 + 47 * 60 + 16.854775807  # int64 nanoseconds


def _go_seconds(text: str) -> float:
    """A Go duration's seconds; NaN (never a valid TTL) when Go would refuse the text."""
    if not _GO_DURATION.fullmatch(text):
        return float("nan")
    total = sum(float(number) * _GO_UNITS[unit] for number, unit in _GO_PAIR.findall(text))
    return -total if text.startswith("-") else total


def _go_string(text: str) -> str:
    """A string as Go's encoding/json writes it (escaping HTML and the JS line separators)."""
    out = ['"']
    short = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r"}
    short["\t"] = "\\t"
    for ch in text:
        if ch in short:
            out.append(short[ch])
        elif ord(ch) < 0x20 or ch in "<>&\u2028\u2029":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _go_json(value: Any) -> str:
    """Go's compact encoding of what the original marshalled: objects keep their field order."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _go_string(value)
    if isinstance(value, list):
        return "[" + ",".join(_go_json(item) for item in value) + "]"
    assert isinstance(value, dict)
    return "{" + ",".join(f"{_go_string(k)}:{_go_json(v)}" for k, v in value.items()) + "}"


def _resource(item: pb.Dataset | pb.Algorithm) -> dict[str, Any]:
    out: dict[str, Any] = {"hash": list(item.hash)}  # always there, numbers, not base64
    if item.provider:
        out["provider"] = item.provider
    if item.id:
        out["id"] = item.id
    return out


def spec_manifest(request: pb.ComputationRunReq) -> dict[str, Any]:
    """The manifest as docs/contracts.md describes it, keys in the original's struct order."""
    doc: dict[str, Any] = {}
    for key in ("id", "name", "description"):  # each left out when empty
        if getattr(request, key):
            doc[key] = getattr(request, key)
    if request.datasets:
        doc["datasets"] = [_resource(d) for d in request.datasets]
    doc["algorithms"] = _resource(request.algorithm)  # plural key, one object
    if request.result_consumers:
        doc["result_consumers"] = list(request.result_consumers)
    c = request.agent_config
    doc["agent_config"] = {  # always present, every key always present
        "log_level": c.log_level,
        "host": c.host,
        "port": c.port,
        "cert_file": c.cert_file,
        "server_key": c.key_file,
        "server_ca_file": c.server_ca_file,
        "client_ca_file": c.client_ca_file,
        "attested_tls": c.attested_tls,
    }
    return doc


# -- strategies ---------------------------------------------------------------------------------

# Characters that need escaping, in Go's or JSON's view, and some that look as if they might.
_TRICKY = "<>&\"\\/'\u2028\u2029\x00\x01\x08\x0c\n\r\t\x1f\x7f\x80\u00e9\u200b\ufeff\U0001f600"
texts = st.one_of(
    st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=24),
    st.text(alphabet=st.sampled_from(_TRICKY + "ab "), max_size=24),
    st.sampled_from(["", "<script>alert(1)</script>", "a&b", "\u2028", "ü", "名前", "\x00"]),
)
ids = st.one_of(
    texts,
    st.integers(MAX_ID_LENGTH - 2, MAX_ID_LENGTH + 2).map(lambda n: "x" * n),
    st.from_regex(r"[a-z0-9-]{1,40}", fullmatch=True),
)
hashes = st.one_of(
    st.binary(min_size=HASH_SIZE, max_size=HASH_SIZE),
    st.binary(max_size=2 * HASH_SIZE),
    st.sampled_from([b"", b"\x00" * (HASH_SIZE - 1), b"\xff" * (HASH_SIZE + 1)]),
)
datasets = st.builds(pb.Dataset, provider=texts, id=texts, hash=hashes)
algorithms = st.builds(pb.Algorithm, provider=texts, id=texts, hash=hashes)
agent_configs = st.builds(
    pb.AgentConfig,
    port=st.one_of(texts, st.integers(-1, 70000).map(str)),
    host=texts,
    cert_file=texts,
    key_file=texts,
    client_ca_file=texts,
    server_ca_file=texts,
    log_level=texts,
    attested_tls=st.booleans(),
)


# Empty (no TTL), Go durations near and beyond the bounds, and anything else.
ttls = st.one_of(
    st.just(""),
    st.from_regex(r"[-+]?([0-9]{1,8}(\.[0-9]{0,3})?|\.[0-9]{1,3})(ns|us|ms|s|m|h)", fullmatch=True),
    st.sampled_from(["0", "0s", "2562047h", "2562048h", "1h30m", "5", "1h 30m", "\u0665s"]),
    texts,
)


@st.composite
def run_requests(draw: st.DrawFn) -> pb.ComputationRunReq:
    """Requests with any field missing or set, near the validity boundary more than not."""
    request = pb.ComputationRunReq(
        id=draw(ids),
        name=draw(texts),
        description=draw(texts),
        datasets=draw(st.lists(datasets, max_size=4)),
        result_consumers=draw(st.lists(texts, max_size=4)),
        ttl=draw(ttls),
    )
    if draw(st.booleans()) or draw(st.booleans()):
        request.algorithm.CopyFrom(draw(algorithms))
    if draw(st.booleans()) or draw(st.booleans()):
        request.agent_config.CopyFrom(draw(agent_configs))
    return request


@st.composite
def valid_run_requests(draw: st.DrawFn) -> pb.ComputationRunReq:
    """Requests that must be accepted: the manifest properties need plenty of these."""
    good_hash = st.binary(min_size=HASH_SIZE, max_size=HASH_SIZE)
    request = pb.ComputationRunReq(
        id=draw(st.text(alphabet=st.characters(min_codepoint=0x20, exclude_categories=["Cs"]),
                        min_size=1, max_size=MAX_ID_LENGTH)
                     .filter(lambda s: not any(0x7F <= ord(ch) <= 0x9F for ch in s))),
        name=draw(texts),
        description=draw(texts),
        datasets=draw(st.lists(st.builds(pb.Dataset, provider=texts, id=texts, hash=good_hash),
                               max_size=4)),
        algorithm=draw(st.builds(pb.Algorithm, provider=texts, id=texts, hash=good_hash)),
        result_consumers=draw(st.lists(texts, max_size=4)),
        agent_config=draw(agent_configs),
    )  # fmt: skip
    # agent_config.port is empty (the agent's default) or a port number.
    request.agent_config.port = draw(st.one_of(st.just(""), st.integers(1, 65535).map(str)))
    return request


# -- properties ---------------------------------------------------------------------------------


def check_manifest(request: pb.ComputationRunReq) -> None:
    """A request that passed validation: its manifest is the contract's, byte for byte Go's."""
    raw = manifest_json(request)
    doc = json.loads(raw)
    assert doc == build_manifest(request)
    expected = spec_manifest(request)
    assert doc == expected
    # Key order is part of the contract (the original's struct order); dict equality is not.
    assert list(doc) == list(expected)
    assert list(doc["agent_config"]) == list(expected["agent_config"])
    for resource in [doc["algorithms"], *doc.get("datasets", [])]:
        assert next(iter(resource)) == "hash"
        assert len(resource["hash"]) == HASH_SIZE
        assert all(type(b) is int and 0 <= b <= 255 for b in resource["hash"])
    assert raw == _go_json(expected).encode()
    for forbidden in (b"<", b">", b"&", "\u2028".encode(), "\u2029".encode()):
        assert forbidden not in raw


def check_request(request: pb.ComputationRunReq) -> None:
    """Refused with InvalidArgumentError naming a field that is really wrong, or accepted and
    turned into the manifest; never any other exception."""
    bad = violations(request)
    try:
        validate_run_request(request)
    except InvalidArgumentError as error:
        message = str(error)
        named = message.split(":", 1)[0]
        assert named in bad, f"{message!r} names {named!r}, but the bad fields are {bad}"
        return
    assert not bad, f"accepted a request with bad {sorted(bad)}"
    check_manifest(request)


def check_valid_request(request: pb.ComputationRunReq) -> None:
    assert violations(request) == set()
    validate_run_request(request)
    check_manifest(request)


def check_wire_bytes(data: bytes) -> None:
    """Whatever bytes parse as a ComputationRunReq (a client may send anything) go through the
    same gate."""
    request = pb.ComputationRunReq()
    try:
        request.ParseFromString(data)
    except DecodeError:
        return
    check_request(request)


def _mutated_wire(request: pb.ComputationRunReq, flips: list[tuple[int, int]]) -> bytes:
    data = bytearray(request.SerializeToString())
    for position, value in flips:
        if data:
            data[position % len(data)] = value
    return bytes(data)


wire_bytes = st.one_of(
    st.binary(max_size=256),
    st.builds(
        _mutated_wire,
        valid_run_requests(),
        st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), max_size=3),
    ),
)

PROPERTIES: dict[str, tuple[Callable[..., None], tuple[SearchStrategy[Any], ...]]] = {
    "request": (check_request, (run_requests(),)),
    "valid-request": (check_valid_request, (valid_run_requests(),)),
    "wire-bytes": (check_wire_bytes, (wire_bytes,)),
}


def property_test(name: str, config: settings) -> Callable[[], None]:
    """The named property as a runnable hypothesis test under ``config``."""
    check, strategies = PROPERTIES[name]
    test: Callable[[], None] = config(given(*strategies)(check))
    return test


test_request = property_test("request", TEST_SETTINGS)
test_valid_request = property_test("valid-request", TEST_SETTINGS)
test_wire_bytes = property_test("wire-bytes", TEST_SETTINGS)


# -- the oracle itself, on cases worked out by hand ---------------------------------------------


def test_go_oracle_matches_known_encodings() -> None:
    """Go 1.22+ encoding/json output for these strings, so the oracle is not checked only
    against the code it checks."""
    assert _go_string('<a href="x">&\u2028\u2029') == (
        '"\\u003ca href=\\"x\\"\\u003e\\u0026\\u2028\\u2029"'
    )
    assert _go_string("\x00\x1f\x7f\b\f\n\r\t\\/é") == '"\\u0000\\u001f\x7f\\b\\f\\n\\r\\t\\\\/é"'
    assert _go_json({"b": [1, 2], "a": {"t": True}}) == '{"b":[1,2],"a":{"t":true}}'


def _valid() -> pb.ComputationRunReq:
    return pb.ComputationRunReq(
        id="ok",
        algorithm=pb.Algorithm(hash=b"\x01" * HASH_SIZE),
        agent_config=pb.AgentConfig(),
        datasets=[pb.Dataset(hash=b"\x02" * HASH_SIZE), pb.Dataset(hash=b"\x03" * HASH_SIZE)],
    )


SPOILERS: dict[str, Callable[[pb.ComputationRunReq], object]] = {
    "id": lambda r: setattr(r, "id", "bad\nid"),
    "algorithm": lambda r: r.ClearField("algorithm"),
    "agent_config": lambda r: r.ClearField("agent_config"),
    "agent_config.port": lambda r: setattr(r.agent_config, "port", "70000"),
    "algorithm.hash": lambda r: setattr(r.algorithm, "hash", b"x" * 31),
    "datasets[1].hash": lambda r: setattr(r.datasets[1], "hash", b"x" * 33),
}


def test_each_bad_field_is_named_by_both_readings() -> None:
    check_valid_request(_valid())
    for field, spoil in SPOILERS.items():
        request = _valid()
        spoil(request)
        assert violations(request) == {field}
        try:
            validate_run_request(request)
        except InvalidArgumentError as error:
            assert str(error).startswith(f"{field}: ")
        else:
            raise AssertionError(f"bad {field} accepted")


def test_ttl_oracle_on_cases_worked_out_by_hand() -> None:
    """A bad `ttl` is one of the request's bad fields (found by test_wire_bytes: a garbage ttl
    on the wire was refused, rightly, while the oracle knew no ttl rule)."""
    for good in ("20s", "1h30m", "1.5h", ".5s", "+90m", "2562047h"):
        request = pb.ComputationRunReq(ttl=good)
        assert "ttl" not in violations(request), good
    for bad in ("0", "-5s", "5", "5x", "--5s", "1h 30m", "\x00\x00\u1000", "\u0665s", "2562048h"):
        request = pb.ComputationRunReq(ttl=bad)
        assert "ttl" in violations(request), bad
        check_request(request)
    check_wire_bytes(
        pb.ComputationRunReq(
            id="\u1000", ttl="\x00\x00\u1000\u1000" + "\x00" * 36
        ).SerializeToString()
    )
