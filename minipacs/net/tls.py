"""TLS contexts for the DICOM listener and requestor (PS3.15 B.10, BCP 195 profiles).

PS3.15 B.10 (Non-Downgrading BCP 195 TLS Secure Transport Connection Profile): never
TLS 1.0 or 1.1, and the four RFC 7525 (BCP 195) cipher suites, all AEAD with forward
secrecy; TLS 1.3 suites are AEAD by definition and OpenSSL's defaults are kept.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from minipacs.net.connection import Connection

# PS3.15 B.10's four (RFC 7525 4.2), as named by OpenSSL: ECDHE/DHE key exchange, AES-GCM.
BCP195_CIPHERS: Final = ":".join(
    (
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        # The same for ECDSA certificates, among those PS3.15 B.11 (Extended) recommends.
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
    )
)
# The RFC 7919 ffdhe2048 group: without DH parameters OpenSSL never picks a DHE suite,
# and PS3.15 B.11 wants DHE keys of 2048 bits or more.
_DH_PARAMETERS: Final = Path(__file__).with_name("ffdhe2048.pem")


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
    context.load_dh_params(str(_DH_PARAMETERS))
    context.load_cert_chain(certificate, private_key)
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
        # PS3.15 B.10: peers authenticate with certificates; optional unless required.
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


Connected = Callable[[Connection], Awaitable[None]]


@dataclass(eq=False)
class TlsListener:
    """Accepts TCP connections and hands each on once its TLS handshake is done.

    Not asyncio.start_server(ssl=...): a failed handshake there is dropped silently, and
    StreamWriter.start_tls after accepting loses the ClientHello on uvloop (it reads
    before the callback runs). Here each handshake is awaited, so its failure is reported
    to `failed` with the peer's address, and at most `max_handshakes` run at once (past
    that the oldest is cancelled, as for connections that have not associated).
    """

    connected: Connected
    # Called with the peer ("address:port") and why, for each failed handshake.
    failed: Callable[[str, str], None]
    context: ssl.SSLContext
    handshake_timeout: float
    max_handshakes: int
    sock: socket.socket | None = field(default=None, init=False)
    _accepting: asyncio.Task[None] | None = field(default=None, init=False)
    _closing: bool = field(default=False, init=False)
    # Handshakes in progress, oldest first.
    _handshakes: dict[asyncio.Task[None], None] = field(default_factory=dict, init=False)

    @property
    def port(self) -> int:
        """The bound port (0: connections come from a supervisor, see adopt)."""
        return int(self.sock.getsockname()[1]) if self.sock is not None else 0

    async def start(self, host: str, port: int) -> None:
        """Bind and start accepting."""
        self.sock = socket.create_server((host, port), backlog=1024)
        self.sock.setblocking(False)
        self._accepting = asyncio.create_task(self._accept(self.sock))

    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                connection, address = await loop.sock_accept(listening)
            except OSError:
                # EMFILE and the like: the next accept may succeed once some close.
                await asyncio.sleep(0.1)
                continue
            self.adopt(connection, f"{address[0]}:{address[1]}")

    def adopt(self, connection: socket.socket, peer: str) -> None:
        """Start the handshake of an accepted connection (here, or by a supervisor)."""
        task = asyncio.create_task(self._handshake(connection, peer))
        self._handshakes[task] = None
        task.add_done_callback(self._handshakes.pop)
        if len(self._handshakes) > self.max_handshakes:
            next(iter(self._handshakes)).cancel()

    async def _handshake(self, connection: socket.socket, peer: str) -> None:
        loop = asyncio.get_running_loop()
        # The callback runs (as its own task) only once the handshake succeeded.
        protocol = Connection(self.connected)
        try:
            await loop.connect_accepted_socket(
                lambda: protocol,
                connection,
                ssl=self.context,
                ssl_handshake_timeout=self.handshake_timeout,
            )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            connection.close()
            self.failed(peer, str(getattr(exc, "reason", None) or type(exc).__name__))
        except asyncio.CancelledError:
            connection.close()
            if not self._closing:
                self.failed(peer, "too many handshakes at once")

    def close(self) -> None:
        """Stop accepting; handshakes in progress are cancelled."""
        self._closing = True
        if self._accepting is not None:
            self._accepting.cancel()
        for task in list(self._handshakes):
            task.cancel()
        if self.sock is not None:
            self.sock.close()

    async def wait_closed(self) -> None:
        """Wait until the accept loop and the handshakes have stopped."""
        tasks = [t for t in (self._accepting, *self._handshakes) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
