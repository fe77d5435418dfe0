"""Connection: the fast path is offered bytes only while the reader is idle; order is kept."""

from __future__ import annotations

import asyncio

from minipacs.net.connection import Connection


class _Transport:
    """Records what the protocol asks of its transport."""

    def __init__(self) -> None:
        self.reading = True
        self.closed = False

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


def _connection(limit: int = 1024) -> tuple[Connection, _Transport, list[bytes]]:
    connection = Connection(limit=limit)
    transport = _Transport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    taken: list[bytes] = []

    def receive_now(data: bytes) -> bool:
        taken.append(data)
        return data.startswith(b"now")

    connection.receive_now = receive_now
    return connection, transport, taken


def test_fast_path_only_while_the_reader_waits() -> None:
    async def main() -> None:
        connection, _, taken = _connection()
        # No reader waiting: queued, the fast path is not asked.
        connection.data_received(b"now-1")
        assert taken == []
        assert await connection.next_item() == b"now-1"
        reader = asyncio.ensure_future(connection.next_item())
        await asyncio.sleep(0)
        connection.data_received(b"now-2")
        assert taken == [b"now-2"]
        assert not reader.done()
        # Declined by the fast path: the waiting reader gets it.
        connection.data_received(b"later")
        assert await reader == b"later"

    asyncio.run(main())


def test_bytes_behind_handed_events_queue_in_order() -> None:
    async def main() -> None:
        connection, _, taken = _connection()
        reader = asyncio.ensure_future(connection.next_item())
        await asyncio.sleep(0)
        connection.hand_on(["event"])
        # The reader was woken but has not run yet: this must not overtake the events.
        connection.data_received(b"now-3")
        assert taken == []
        assert await reader == ["event"]
        assert await connection.next_item() == b"now-3"

    asyncio.run(main())


def test_reading_pauses_over_the_limit_and_resumes_when_taken() -> None:
    async def main() -> None:
        connection, transport, _ = _connection(limit=10)
        connection.data_received(b"x" * 8)
        assert transport.reading
        connection.data_received(b"y" * 8)
        assert not transport.reading
        assert await connection.next_item() == b"x" * 8
        assert not transport.reading
        assert await connection.next_item() == b"y" * 8
        assert transport.reading

    asyncio.run(main())


def test_end_comes_after_what_is_queued() -> None:
    async def main() -> None:
        connection, _, _ = _connection()
        connection.data_received(b"last")
        connection.eof_received()
        assert await connection.next_item() == b"last"
        assert await connection.next_item() == b""
        connection.connection_lost(None)
        await connection.wait_closed()

    asyncio.run(main())


def test_drain_waits_for_resume_writing() -> None:
    async def main() -> None:
        connection, _, _ = _connection()
        await connection.drain()
        connection.pause_writing()
        drained = asyncio.ensure_future(connection.drain())
        await asyncio.sleep(0)
        assert not drained.done()
        connection.resume_writing()
        await drained

    asyncio.run(main())
