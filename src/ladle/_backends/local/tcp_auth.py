"""TCP for the RPC layer: no frame is read from a peer that hasn't proven the secret.

A Unix socket's file mode is its authentication; a TCP listener has none, so
every peer first proves it knows the instance's secret: the server sends a
nonce, the client answers with its own nonce and an HMAC of both, the server
proves itself the same way, and only then is a frame parsed.  A peer that
fails, stalls or sends anything else is dropped having had nothing unpickled.
For a backend that spans machines; the local backend uses Unix sockets only.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import socket

from ..._core.transport import RequestServer
from .rpc import Connection, ServerConnection


NONCE_BYTES = 32
MAC_BYTES = 32  # HMAC-SHA256
HANDSHAKE_TIMEOUT_S = 5.0
_CLIENT_ROLE = b"ladle-rpc-1 client"
_SERVER_ROLE = b"ladle-rpc-1 server"


class AuthenticationError(ConnectionError):
    """The peer did not prove it knows the instance's secret (or the handshake stalled)."""


def new_secret() -> bytes:
    """A fresh per-instance secret for ``serve_tcp`` and ``open_connection``."""
    return secrets.token_bytes(32)


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes) or len(secret) < 16:
        raise ValueError("a TCP listener needs a secret of at least 16 random bytes")


def _proof(secret: bytes, role: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(secret, role + server_nonce + client_nonce, hashlib.sha256).digest()


class _AuthenticatingServerConnection(ServerConnection):
    """A ServerConnection that parses no frame until the peer has proven it knows the
    secret: it reads exactly the client's proof (nonce + MAC), within a deadline, and
    drops the peer on a wrong proof, a timeout, or a single byte more."""

    def __init__(self, server: RequestServer, secret: bytes, timeout_s: float) -> None:
        super().__init__(server)
        self._secret = secret
        self._timeout_s = timeout_s
        self._nonce = secrets.token_bytes(NONCE_BYTES)
        self._proof_buf: bytearray | None = bytearray()  # None once authenticated
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._deadline = self._loop.call_later(
            self._timeout_s, self._protocol_error, "handshake timed out")
        transport.write(self._nonce)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        buf = self._proof_buf
        if buf is None:
            super().data_received(data)
            return
        if len(buf) + len(data) > NONCE_BYTES + MAC_BYTES:
            # An honest client waits for the server's proof before its first frame.
            self._protocol_error("data before the handshake finished")
            return
        buf += data
        if len(buf) < NONCE_BYTES + MAC_BYTES:
            return
        client_nonce, mac = bytes(buf[:NONCE_BYTES]), bytes(buf[NONCE_BYTES:])
        if not hmac.compare_digest(
                mac, _proof(self._secret, _CLIENT_ROLE, self._nonce, client_nonce)):
            self._protocol_error("authentication failed")
            return
        self._proof_buf = None
        if self._deadline is not None:
            self._deadline.cancel()
        assert self._transport is not None
        self._transport.write(_proof(self._secret, _SERVER_ROLE, self._nonce, client_nonce))

    def _protocol_error(self, why: str) -> None:
        self._proof_buf = bytearray()  # nothing more is parsed, whatever is in flight
        super()._protocol_error(why)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        if not chunk:
            raise AuthenticationError("the peer closed the connection during the handshake")
        data += chunk
    return data


async def _authenticated_socket(hostport: str, secret: bytes, timeout_s: float) -> socket.socket:
    """A connected TCP socket whose peer has proven it knows ``secret`` (and we have)."""
    host, _, port = hostport.rpartition(":")
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout_s):
            await loop.sock_connect(sock, addr)
            server_nonce = await _recv_exactly(loop, sock, NONCE_BYTES)
            client_nonce = secrets.token_bytes(NONCE_BYTES)
            await loop.sock_sendall(
                sock, client_nonce + _proof(secret, _CLIENT_ROLE, server_nonce, client_nonce))
            answer = await _recv_exactly(loop, sock, MAC_BYTES)
        if not hmac.compare_digest(
                answer, _proof(secret, _SERVER_ROLE, server_nonce, client_nonce)):
            raise AuthenticationError(f"tcp:{hostport} did not prove it knows the secret")
    except TimeoutError:
        sock.close()
        raise AuthenticationError(f"the handshake with tcp:{hostport} timed out") from None
    except BaseException:
        sock.close()
        raise
    return sock


async def open_tcp_connection(address: str, hostport: str, secret: bytes | None,
                              handshake_timeout_s: float) -> Connection:
    if secret is None:
        raise ValueError(f"connecting to {address} needs the instance's secret")
    _check_secret(secret)
    sock = await _authenticated_socket(hostport, secret, handshake_timeout_s)
    loop = asyncio.get_running_loop()
    try:
        _, protocol = await loop.create_connection(lambda: Connection(address), sock=sock)
    except BaseException:
        sock.close()
        raise
    return protocol


async def serve_tcp(host: str, port: int, server: RequestServer, secret: bytes, *,
                    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S) -> asyncio.AbstractServer:
    """Serve on TCP ``host:port`` (0: any free port); every peer must first prove it knows
    ``secret`` (see ``open_connection``) or is dropped before a frame is read."""
    _check_secret(secret)
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: _AuthenticatingServerConnection(server, secret, handshake_timeout_s),
        host, port)
