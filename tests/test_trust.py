"""Access control end to end: rules per calling AE, unknown AEs, hosts, User Identity;
every refusal answered as the standard says, logged and counted."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping

import pytest

from minipacs.passwords import hash_password
from tests import peers
from tests.dicom_tools import echoscu
from tests.servers import MinipacsProcess, free_port, running_minipacs

NOT_AUTHORIZED = 0x0124
CONFIG = """
[access]
unknown_ae = "refuse-services"
user_identity = "optional"

[access.ECHOONLY]
services = ["echo"]

[access.FAR]
hosts = ["10.1.0.0/16"]

[access.NEAR]
hosts = ["127.0.0.1"]

[access.ONEATATIME]
max_associations = 1

[users]
alice = "{alice}"
"""


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MinipacsProcess, int]]:
    """minipacs with access rules, User Identity checked, and its metrics endpoint."""
    workdir = tmp_path_factory.mktemp("trust")
    config = workdir / "minipacs.toml"
    config.write_text(CONFIG.format(alice=hash_password("s3cret")))
    metrics = free_port()
    with running_minipacs(
        workdir,
        {
            "MINIPACS_CONFIG": str(config),
            "MINIPACS_METRICS_PORT": str(metrics),
            "MINIPACS_STORAGE_MIN_FREE_BYTES": "0",
            "MINIPACS_STORAGE_FSYNC": "false",
        },
    ) as process:
        yield process, metrics


def _events(server: MinipacsProcess, name: str) -> list[dict[str, object]]:
    time.sleep(0.2)
    lines = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line["event"] == name]


def _metric(port: int, line_start: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start)]
    return sum(values)


def test_service_not_granted_is_refused_0124(guarded: tuple[MinipacsProcess, int]) -> None:
    server, metrics = guarded
    assoc = peers.associate(server.port, "ECHOONLY")
    assert assoc.is_established
    result = peers.statuses(assoc)
    assert result["echo"].Status == 0
    for service in ("store", "find"):
        # PS3.7 C.5: 0x0124 Refused: Not Authorized, with an Error Comment.
        assert result[service].Status == NOT_AUTHORIZED
        assert result[service].ErrorComment == f"ECHOONLY may not {service}"
    refused = {event["service"] for event in _events(server, "access.refused")}
    assert {"store", "find"} <= refused
    assert _metric(metrics, 'minipacs_dimse_operations_total{service="C-STORE",status="0x0124"}')
    assert not list((server.workdir / "store").rglob("*.dcm")), "nothing was stored"


def test_unknown_ae_may_associate_but_use_nothing(guarded: tuple[MinipacsProcess, int]) -> None:
    server, _ = guarded
    assoc = peers.associate(server.port, "STRANGER")
    assert assoc.is_established
    assert {name: s.Status for name, s in peers.statuses(assoc).items()} == {
        "echo": NOT_AUTHORIZED,
        "store": NOT_AUTHORIZED,
        "find": NOT_AUTHORIZED,
    }


def test_known_ae_from_another_address_is_rejected(guarded: tuple[MinipacsProcess, int]) -> None:
    server, metrics = guarded
    # PS3.8 Table 9-21: rejected-permanent, service-user, calling AE title not recognized.
    assert peers.rejection(server.port, "FAR") == (1, 1, 3)
    assert peers.rejection(server.port, "NEAR") is None
    peers.served(server.port, "NEAR")
    reasons = [event["reason"] for event in _events(server, "association.rejected")]
    assert "peer address" in reasons
    assert _metric(metrics, 'minipacs_associations_rejected_total{reason="peer address"}') >= 1


def test_per_ae_association_limit(guarded: tuple[MinipacsProcess, int]) -> None:
    server, _ = guarded
    first = peers.associate(server.port, "ONEATATIME")
    assert first.is_established
    try:
        # Transient, service-provider (presentation), local limit exceeded.
        assert peers.rejection(server.port, "ONEATATIME") == (2, 3, 2)
        assert peers.rejection(server.port, "NEAR") is None, "other AEs are not limited"
    finally:
        first.release()
    # The server counts the first one out once its connection has closed, a moment later.
    deadline = time.monotonic() + 5
    while peers.rejection(server.port, "ONEATATIME") is not None:
        assert time.monotonic() < deadline, "the first association was never counted out"
        time.sleep(0.05)


def test_user_identity(guarded: tuple[MinipacsProcess, int]) -> None:
    server, _ = guarded
    assoc = peers.associate(server.port, "NEAR", peers.identity("alice", "s3cret"))
    assert assoc.is_established
    # PS3.7 D.3.3.7.2: the positive response the requestor asked for.
    response = assoc.acceptor.user_identity
    assert response is not None and response.server_response == b""
    assoc.release()
    assert peers.rejection(server.port, "NEAR", peers.identity("alice")) is None
    # A wrong passcode or an unknown user: rejected-permanent by the ACSE (PS3.7 D.3.3.7).
    assert peers.rejection(server.port, "NEAR", peers.identity("alice", "guess")) == (1, 2, 1)
    assert peers.rejection(server.port, "NEAR", peers.identity("mallory", "x")) == (1, 2, 1)
    log = server.log_text()
    assert "s3cret" not in log and "guess" not in log, "passcodes never reach the log"
    reasons = [event["reason"] for event in _events(server, "association.rejected")]
    assert {"user identity passcode", "user identity unknown"} <= set(reasons)


def test_allowed_calling_aes_still_works(
    minipacs_with: Callable[[Mapping[str, str]], MinipacsProcess],
) -> None:
    # Configured the old way: server.allowed_calling_aes only.
    legacy = minipacs_with({"MINIPACS_SERVER_ALLOWED_CALLING_AES": "CT1,MR1"})
    assert echoscu(legacy.port, calling="CT1") == 0
    assert echoscu(legacy.port, calling="OTHER") != 0
    assert peers.rejection(legacy.port, "OTHER") == (1, 1, 3)
