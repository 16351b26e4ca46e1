"""A TCP relay between the proxy and a dependency (Redis, PostgreSQL) that a test can
pause, cut and restore, so an outage is made without touching the machine's services.

- ``pause()``: a partition. Connections stay open and new ones are accepted, but no byte
  passes either way until ``restore()``; what was sent meanwhile arrives then, as TCP's
  retransmissions would deliver it.
- ``cut()``: the dependency is gone. Every open connection is reset, and new ones are
  reset as soon as they are accepted, until ``restore()``.

It runs on a thread and event loop of its own, so the process under test (in this
process, or a child) sees a real network peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator


class Relay:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._cut = False
        self._transports: set[asyncio.WriteTransport] = set()
        self.port = 0
        self.accepted = 0  # connections accepted so far, for the tests to wait on

    def __enter__(self) -> Relay:
        self._thread.start()
        self._call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _call(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        self._reset_all()

    def pause(self) -> None:
        async def pause() -> None:
            assert self._flowing is not None
            self._flowing.clear()

        self._call(pause())

    def cut(self) -> None:
        async def cut() -> None:
            assert self._flowing is not None
            self._cut = True
            self._flowing.set()  # paused pipes wake up, find the cut and end
            self._reset_all()

        self._call(cut())

    def restore(self) -> None:
        async def restore() -> None:
            assert self._flowing is not None
            self._cut = False
            self._flowing.set()

        self._call(restore())

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.pause()
        try:
            yield
        finally:
            self.restore()

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        self.cut()
        try:
            yield
        finally:
            self.restore()

    def _reset_all(self) -> None:
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._cut:
            client_w.transport.abort()
            return
        self._transports.add(client_w.transport)
        assert self._flowing is not None
        await self._flowing.wait()
        try:
            upstream_r, upstream_w = await asyncio.open_connection(*self._target)
        except OSError:
            client_w.transport.abort()
            return
        if self._cut:
            client_w.transport.abort()
            upstream_w.transport.abort()
            return
        self._transports.add(upstream_w.transport)
        await asyncio.gather(self._pipe(client_r, upstream_w), self._pipe(upstream_r, client_w))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while True:
                await self._flowing.wait()  # paused: nothing is read, so nothing passes
                data = await reader.read(65536)
                if not data:
                    break
                await self._flowing.wait()
                if self._cut:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.transport.abort() if self._cut else writer.close()
            self._transports.discard(writer.transport)
