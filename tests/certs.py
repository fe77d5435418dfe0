"""Test certificates made with the openssl CLI: a CA, a server and a client certificate."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Certificates:
    """PEM files: the CA, the server's (127.0.0.1, localhost) and a client's key and cert."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    # Signed by a CA the server does not know.
    stranger_cert: Path
    stranger_key: Path


def _openssl(*args: str) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("openssl not found: install the openssl package")
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _issue(folder: Path, name: str, ca: str, san: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    csr, ext = folder / f"{name}.csr", folder / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n")
    # RSA: DCMTK's default (non-downgrading BCP 195) profile offers ECDHE-RSA suites.
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(key))
    _openssl("req", "-new", "-key", str(key), "-subj", f"/CN={name}", "-out", str(csr))
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-sha256", "-extfile", str(ext), "-out", str(cert),
    )  # fmt: skip
    return cert, key


def _ca(folder: Path, name: str) -> str:
    base = str(folder / name)
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{base}.key",
        "-out", f"{base}.pem", "-subj", f"/CN={name}", "-days", "2", "-sha256",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return base


def make_certificates(folder: Path) -> Certificates:
    """A fresh CA and the certificates it issues, in folder."""
    ca = _ca(folder, "test-ca")
    server = _issue(folder, "server", ca, "IP:127.0.0.1,DNS:localhost")
    client = _issue(folder, "client", ca, "DNS:client")
    stranger = _issue(folder, "stranger", _ca(folder, "other-ca"), "DNS:stranger")
    return Certificates(Path(f"{ca}.pem"), *server, *client, *stranger)
