"""Access policy, limits and password hashes, sans-I/O; and how [access]/[users]/[tls] load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from minipacs.app import access_policy, server_config
from minipacs.config import ConfigError, load_settings
from minipacs.net import negotiation as neg
from minipacs.net.access import (
    REJECT_IDENTITY,
    USERNAME,
    USERNAME_AND_PASSCODE,
    AccessPolicy,
    Admission,
    AeRule,
    Identity,
    RateLimiter,
    Refusal,
    parse_networks,
    peer_host,
)
from minipacs.passwords import hash_password, password_hash_problem, verify_password

ALICE = hash_password("correct horse")


def _policy(**kwargs: object) -> AccessPolicy:
    rules = {
        "ECHOONLY": AeRule(frozenset({"echo"})),
        "LAN": AeRule(networks=parse_networks(["127.0.0.1", "10.1.0.0/16", "::1"])),
    }
    return AccessPolicy(rules, users={"alice": ALICE}, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("unknown", "refused", "may_echo"),
    [("allow", None, True), ("refuse-services", None, False), ("refuse-association", 1, False)],
)
def test_unknown_ae_policies(unknown: str, refused: int | None, may_echo: bool) -> None:
    policy = _policy(unknown_ae=unknown)
    refusal = policy.association_refusal("STRANGER", "127.0.0.1")
    # PS3.8 Table 9-21: rejected-permanent, service-user, calling AE title not recognized.
    assert refusal == (Refusal("calling AE title", neg.REJECT_CALLING_AE) if refused else None)
    assert policy.allows("STRANGER", "echo") is may_echo
    # Known AEs are never affected by the policy for unknown ones.
    assert policy.association_refusal("ECHOONLY", "192.0.2.1") is None


def test_services_per_ae() -> None:
    policy = _policy(unknown_ae="refuse-association")
    assert policy.allows("ECHOONLY", "echo")
    assert not any(policy.allows("ECHOONLY", s) for s in ("store", "find", "move", "get"))
    assert all(policy.allows("LAN", s) for s in ("echo", "store", "find", "move", "get"))


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1", True),
        ("10.1.200.7", True),
        ("::1", True),
        ("10.2.0.1", False),
        ("127.0.0.2", False),
        ("::ffff:10.2.0.1", False),
        ("not an address", False),
    ],
)
def test_hosts_per_ae(host: str, allowed: bool) -> None:
    refusal = _policy().association_refusal("LAN", host)
    assert refusal == (None if allowed else Refusal("peer address", neg.REJECT_CALLING_AE))


def test_peer_host() -> None:
    assert peer_host("127.0.0.1:4242") == "127.0.0.1"
    assert peer_host("::1:4242") == "::1"


@pytest.mark.parametrize(
    ("mode", "identity", "why"),
    [
        ("off", Identity(USERNAME_AND_PASSCODE, b"alice", b"wrong"), None),
        ("optional", None, None),
        ("optional", Identity(USERNAME_AND_PASSCODE, b"alice", b"correct horse"), None),
        ("optional", Identity(USERNAME, b"alice"), None),
        ("optional", Identity(USERNAME_AND_PASSCODE, b"alice", b"wrong"), "passcode"),
        ("optional", Identity(USERNAME_AND_PASSCODE, b"mallory", b"x"), "unknown"),
        ("optional", Identity(3, b"kerberos ticket"), "type not supported"),
        ("required", None, "missing"),
        ("required", Identity(USERNAME_AND_PASSCODE, b"alice", b"correct horse"), None),
    ],
)
def test_user_identity(mode: str, identity: Identity | None, why: str | None) -> None:
    refusal = _policy(user_identity=mode).identity_refusal(identity)
    if why is None:
        assert refusal is None
    else:
        assert refusal == Refusal(f"user identity {why}", REJECT_IDENTITY)


def test_positive_response_only_when_asked_and_checked() -> None:
    asked = Identity(USERNAME, b"alice", positive_response_requested=True)
    assert _policy(user_identity="optional").confirms_identity(asked)
    assert not _policy(user_identity="off").confirms_identity(asked)
    assert not _policy(user_identity="optional").confirms_identity(Identity(USERNAME, b"alice"))


def test_rate_limiter_refills() -> None:
    now = [0.0]
    limiter = RateLimiter(3, lambda: now[0])
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b"), "each address has its own bucket"
    now[0] = 19.0
    assert not limiter.allow("a")
    now[0] = 40.0
    # 3 a minute: one more token every 20 s; a refused attempt takes none.
    assert [limiter.allow("a") for _ in range(3)] == [True, True, False]


def test_rate_limiter_memory_is_bounded() -> None:
    now = [0.0]
    limiter = RateLimiter(60, lambda: now[0], max_keys=100)
    for index in range(100):
        limiter.allow(f"10.0.0.{index}")
    now[0] = 60.0
    limiter.allow("10.0.1.1")
    assert len(limiter._buckets) == 1


def test_admission_per_ae_and_per_host() -> None:
    policy = AccessPolicy({"ONE": AeRule(max_associations=1)})
    admission = Admission(policy, max_per_ae=2, per_minute_per_host=0, clock=lambda: 0.0)
    local_limit = Refusal("calling AE association limit", neg.REJECT_LOCAL_LIMIT)
    admission.opened("ONE")
    assert admission.limit_refusal("ONE") == local_limit
    admission.opened("CT")
    assert admission.limit_refusal("CT") is None
    admission.opened("CT")
    assert admission.limit_refusal("CT") == local_limit
    admission.closed("CT")
    assert admission.limit_refusal("CT") is None
    assert admission.rate_refusal("h") is None, "no rate limit configured"
    rated = Admission(AccessPolicy(), 0, per_minute_per_host=2, clock=lambda: 0.0)
    assert [rated.rate_refusal("h") for _ in range(3)] == [
        None,
        None,
        Refusal("association rate", neg.REJECT_LOCAL_LIMIT),
    ]


def test_password_hashes() -> None:
    assert ALICE.startswith("scrypt$16384$8$1$")
    assert verify_password(b"correct horse", ALICE)
    assert not verify_password(b"correct horse ", ALICE)
    assert hash_password("x") != hash_password("x"), "salted"
    assert password_hash_problem(ALICE) is None
    for bad in ("correct horse", "scrypt$16384$8$1$AAAA$AAAA", "scrypt$3$8$1$x$y", ""):
        assert password_hash_problem(bad) is not None


def _load(tmp_path: Path, text: str) -> AccessPolicy:
    path = tmp_path / "minipacs.toml"
    path.write_text(text)
    return access_policy(load_settings(path, environ={}))


def test_access_tables_load(tmp_path: Path) -> None:
    policy = _load(
        tmp_path,
        '[access]\nunknown_ae = "refuse-services"\nuser_identity = "optional"\n'
        '[access.CT1]\nservices = ["echo", "store"]\nhosts = ["10.1.0.0/16"]\n'
        "max_associations = 2\n"
        f'[users]\nalice = "{ALICE}"\n',
    )
    assert policy.unknown_ae == "refuse-services"
    assert policy.rules["CT1"] == AeRule(
        frozenset({"echo", "store"}), parse_networks(["10.1.0.0/16"]), 2
    )
    assert (
        policy.identity_refusal(Identity(USERNAME_AND_PASSCODE, b"alice", b"correct horse")) is None
    )
    assert policy.users == {"alice": ALICE}


def test_allowed_calling_aes_folds_into_the_rules(tmp_path: Path) -> None:
    policy = _load(
        tmp_path,
        '[server]\nallowed_calling_aes = ["CT1", "MR1"]\n[access.MR1]\nservices = ["echo"]\n',
    )
    assert policy.unknown_ae == "refuse-association"
    assert policy.association_refusal("OTHER", "127.0.0.1") is not None
    assert policy.allows("CT1", "store")
    assert not policy.allows("MR1", "store"), "its own [access.MR1] rule wins"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[access.CT1]\nservices = ["echo", "print"]\n', 'access.CT1.services: item "print"'),
        ('[access.CT1]\nhosts = ["10.1.0.0/33"]\n', "access.CT1.hosts: item"),
        ('[access."TOO LONG AE TITLE 17"]\n', "access.TOO LONG AE TITLE 17: must be an AE"),
        ('[access]\nunknown_ae = "deny"\n', "access.unknown_ae: must be one of allow"),
        ('[users]\nalice = "plain secret"\n', "users.alice: must be a hash from"),
        ("[tls]\nport = 2762\n", "tls.certificate: tls.port needs a certificate and key"),
        ("[tls]\nrequire_client_cert = true\n", "tls.ca_file: require_client_cert needs"),
    ],
)
def test_bad_trust_settings(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "minipacs.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_settings(path, environ={})
    assert message in str(error.value)
    assert "plain secret" not in str(error.value), "a password is never echoed"


def test_users_only_in_the_file() -> None:
    with pytest.raises(ConfigError, match="users can only be set in the configuration file"):
        load_settings(None, environ={"MINIPACS_USERS_ALICE": "x"})


def test_hash_password_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "minipacs", "hash-password"],
        input="correct horse\n",
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    stored = result.stdout.strip()
    assert verify_password(b"correct horse", stored)
    assert "correct horse" not in result.stdout + result.stderr


def test_tls_files_that_do_not_load_are_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "minipacs.toml"
    path.write_text(
        f'[tls]\nport = 2762\ncertificate = "{tmp_path}/none.pem"\n'
        f'private_key = "{tmp_path}/none.key"\n'
    )
    with pytest.raises(ConfigError, match="tls: cannot load certificate"):
        server_config(load_settings(path, environ={}))
