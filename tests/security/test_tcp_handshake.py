"""A TCP listener of the RPC layer (``tcp_auth.serve_tcp``) reads no frame from a peer that has
not proven it knows the instance's secret.

Peers that skip the handshake, use the wrong secret, send garbage, stall, or replay a
proof made for another connection are dropped, and nothing they sent is unpickled: a
frame carrying a pickle that would create a marker file never does, and
``pickle.loads`` is never called.  An authenticated client is served; a client refuses
a server that can't prove the secret.  (Today's local backend has no TCP listener:
its Unix sockets are authenticated by their file mode, see test_local_privacy.py.)
"""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ladle._backends.local import rpc, sockets, tcp_auth

BOUND_S = 10.0


class Recorder:
    """A RequestServer that answers every request with its arguments, and remembers it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def start_request(self, meta: tuple[Any, ...], args: tuple[Any, ...],
                      kwargs: dict[str, Any], sink: Any) -> None:
        self.calls.append((meta[1], args))
        sink.result(("echo", args))


class RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


@pytest.fixture
def loads_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every ``pickle.loads`` the RPC layer makes, recorded (and still performed)."""
    calls: list[bytes] = []

    def loads(data: Any, **kwargs: Any) -> Any:
        calls.append(bytes(data))
        return pickle.loads(data, **kwargs)

    monkeypatch.setattr(rpc, "pickle", SimpleNamespace(loads=loads))
    return calls


@pytest.fixture
async def listener() -> AsyncIterator[SimpleNamespace]:
    secret = tcp_auth.new_secret()
    recorder = Recorder()
    server = await tcp_auth.serve_tcp("127.0.0.1", 0, recorder, secret, handshake_timeout_s=0.5)
    port = server.sockets[0].getsockname()[1]
    yield SimpleNamespace(secret=secret, recorder=recorder, port=port,
                          address=f"tcp:127.0.0.1:{port}")
    server.close()
    await server.wait_closed()


def evil_frame(marker: Path) -> bytes:
    """A well-formed REQUEST frame whose payload creates ``marker`` when unpickled."""
    return _frame(rpc.REQUEST, 1, pickle.dumps(RunsCommand(f"touch {marker}")))


def _frame(kind: int, key: int, payload: bytes) -> bytes:
    return rpc.HEADER.pack(len(payload), kind, key) + payload


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """What the server sent until it closed the connection (fails past the bound)."""
    received = b""
    async with asyncio.timeout(BOUND_S):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk


async def handshake_bytes(reader: asyncio.StreamReader, secret: bytes) -> bytes:
    """A client's proof for this connection's nonce, made with ``secret``."""
    server_nonce = await reader.readexactly(tcp_auth.NONCE_BYTES)
    client_nonce = os.urandom(tcp_auth.NONCE_BYTES)
    return client_nonce + tcp_auth._proof(secret, tcp_auth._CLIENT_ROLE, server_nonce, client_nonce)


async def test_authenticated_client_is_served(listener: SimpleNamespace) -> None:
    conns = [await sockets.open_connection(listener.address, secret=listener.secret)
             for _ in range(2)]
    big = os.urandom(3 * 1024 * 1024)
    answers = await asyncio.gather(conns[0].call("m", 1, 2), conns[1].call("big", big),
                                   conns[0].call("m", "x"))
    assert answers == [("echo", (1, 2)), ("echo", (big,)), ("echo", ("x",))]
    for conn in conns:
        await conn.aclose()


async def test_unauthenticated_peers_are_dropped_unread(
        listener: SimpleNamespace, tmp_path: Path, loads_calls: list[bytes]) -> None:
    marker = tmp_path / "unpickled"
    frame = evil_frame(marker)
    wrong = tcp_auth.new_secret()

    async def peer(send: Any) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        try:
            await send(reader, writer)
            return await closed_by_server(reader)
        finally:
            writer.close()
            await writer.wait_closed()

    async def no_handshake(reader: Any, writer: Any) -> None:
        writer.write(frame)

    async def short_frame_as_proof(reader: Any, writer: Any) -> None:
        writer.write(_frame(rpc.REQUEST, 1, pickle.dumps(RunsCommand(f"touch {marker}"))[:51]))

    async def wrong_secret(reader: Any, writer: Any) -> None:
        writer.write(await handshake_bytes(reader, wrong))
        await writer.drain()
        writer.write(frame)

    async def proof_and_frame_at_once(reader: Any, writer: Any) -> None:
        writer.write(await handshake_bytes(reader, wrong) + frame)

    async def garbage(reader: Any, writer: Any) -> None:
        writer.write(os.urandom(64))

    async def much_garbage(reader: Any, writer: Any) -> None:
        writer.write(os.urandom(100_000))

    async def silent(reader: Any, writer: Any) -> None:
        pass  # says nothing: dropped at the handshake deadline

    async def trickle(reader: Any, writer: Any) -> None:
        writer.write((await handshake_bytes(reader, listener.secret))[:10])  # then stalls

    async def replay(reader: Any, writer: Any) -> None:
        # A correct proof, but made for another connection's nonce.
        other_reader, other_writer = await asyncio.open_connection("127.0.0.1", listener.port)
        proof = await handshake_bytes(other_reader, listener.secret)
        other_writer.close()
        await other_writer.wait_closed()
        await reader.readexactly(tcp_auth.NONCE_BYTES)
        writer.write(proof)
        await writer.drain()
        writer.write(frame)

    for send in (no_handshake, short_frame_as_proof, wrong_secret, proof_and_frame_at_once,
                 garbage, much_garbage, silent, trickle, replay):
        received = await peer(send)
        # At most the server's nonce: no proof of the server's own, no answer.
        assert len(received) <= tcp_auth.NONCE_BYTES, (send.__name__, received)
    with pytest.raises(tcp_auth.AuthenticationError):
        await sockets.open_connection(listener.address, secret=wrong)

    assert loads_calls == []
    assert listener.recorder.calls == []
    assert not marker.exists()

    # Control: the same frame after a correct handshake is read (and would run).
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(await handshake_bytes(reader, listener.secret))
    await reader.readexactly(tcp_auth.MAC_BYTES)  # the server proved itself
    writer.write(frame)
    await closed_by_server(reader)  # os.system's int is no request: dropped, but loaded
    writer.close()
    await writer.wait_closed()
    assert len(loads_calls) == 1
    assert marker.exists()

    # And the listener still serves an authenticated client.
    conn = await sockets.open_connection(listener.address, secret=listener.secret)
    assert await conn.call("after", 1) == ("echo", (1,))
    await conn.aclose()


async def test_client_refuses_a_server_without_the_secret(
        tmp_path: Path, loads_calls: list[bytes]) -> None:
    marker = tmp_path / "unpickled"
    result = _frame(rpc.RESULT, 1, pickle.dumps(RunsCommand(f"touch {marker}")))

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(os.urandom(tcp_auth.NONCE_BYTES))
        await reader.readexactly(tcp_auth.NONCE_BYTES + tcp_auth.MAC_BYTES)
        writer.write(os.urandom(tcp_auth.MAC_BYTES) + result)  # a wrong proof, then a "result"
        await writer.drain()

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pass

    for behaviour in (impostor, mute):
        done = asyncio.Event()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await behaviour(reader, writer)
                await reader.read()  # until the client hangs up
            except ConnectionError:
                pass
            finally:
                writer.close()
                done.set()

        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(tcp_auth.AuthenticationError):
            await sockets.open_connection(f"tcp:127.0.0.1:{port}", secret=tcp_auth.new_secret(),
                                      handshake_timeout_s=0.5)
        async with asyncio.timeout(BOUND_S):
            await done.wait()
        server.close()
        await server.wait_closed()
    assert loads_calls == []
    assert not marker.exists()


async def test_tcp_needs_a_secret() -> None:
    server = Recorder()
    with pytest.raises(ValueError):
        await tcp_auth.serve_tcp("127.0.0.1", 0, server, b"short")
    with pytest.raises(ValueError):
        await sockets.open_connection("tcp:127.0.0.1:1")  # no secret
    with socket.socket() as sock:  # a bare TCP socket can't be served unauthenticated
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        with pytest.raises(ValueError):
            await sockets.serve_socket(sock, server)
