"""TLS contexts for the DICOM listener and requestor (PS3.15 B.9, BCP 195 profiles).

PS3.15 B.9 (Non-Downgrading BCP 195 TLS Secure Transport Connection Profile): TLS 1.2
or later only, and for TLS 1.2 the RFC 7525 (BCP 195) cipher suites, all AEAD with
forward secrecy. TLS 1.3 suites are AEAD by definition and OpenSSL's defaults are kept.
"""

from __future__ import annotations

import ssl
from typing import Final

# RFC 7525 4.2, as named by OpenSSL: ECDHE/DHE key exchange, AES-GCM.
BCP195_CIPHERS: Final = ":".join(
    (
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        # The same suites for ECDSA certificates (PS3.15 B.10, Extended BCP 195 profile).
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
    )
)


def _bcp195(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    # No TLS compression (CRIME) and no renegotiation by the peer (RFC 7525 3.3, 3.5).
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def server_context(
    certificate: str, private_key: str, ca_file: str = "", require_client_cert: bool = False
) -> ssl.SSLContext:
    """The listener's context; client certificates are checked against ca_file if given."""
    context = _bcp195(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(certificate, private_key)
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
        # PS3.15 B.9: peers authenticate with certificates; optional unless required.
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return context


def client_context(
    ca_file: str = "", certificate: str = "", private_key: str = ""
) -> ssl.SSLContext:
    """A requestor's context: the peer is verified against ca_file (else the system CAs)."""
    context = _bcp195(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if certificate:
        context.load_cert_chain(certificate, private_key or None)
    return context
