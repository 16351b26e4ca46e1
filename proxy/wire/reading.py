"""What both upstream clients' responses share (``http1.Response``, ``h2pool``'s
``Http2Response``): status and headers at once, a body the relay reads as it arrives
through a future awaited in its own frame, and a read deadline that one pool timer
checks (``deadlines``)."""

from __future__ import annotations

import asyncio

from multidict import CIMultiDict

from .deadlines import ReadDeadlines


class ArrivingResponse:
    # Thousands are alive at once with streams open: no per-instance dict to collect.
    __slots__ = (
        "_chunks",
        "_deadlines",
        "_done",
        "_error",
        "_headers_done",
        "_waiter",
        "_watched",
        "content_length",
        "headers",
        "last_activity",
        "loop",
        "read_timeout",
        "status",
    )

    def __init__(
        self, loop: asyncio.AbstractEventLoop, deadlines: ReadDeadlines, read_timeout: float
    ) -> None:
        self.loop = loop
        self._deadlines = deadlines
        self.status = 0
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.content_length: int | None = None
        # A list, not a deque: a deque allocates a 64-slot block up front (624 bytes per
        # open stream), where a stream holds one chunk at a time.
        self._chunks: list[bytes] = []
        self._headers_done = False
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.read_timeout = read_timeout
        self.last_activity = loop.time()
        self._watched = False

    def fail(self, error: BaseException) -> None:
        if self._error is None and not self._done:
            self._error = error
            self._stop_watching()
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wakeup(self) -> asyncio.Future[None]:
        """A future the next event sets (bytes, the end, a failure), to await in the
        caller's own frame: with a waiting coroutine of its own, every open stream held
        one more frame, and every chunk cost one more coroutine call. Raises the failure,
        if any, once nothing is left to read before it."""
        if self._error is not None:
            raise self._error
        waiter = self._waiter = self.loop.create_future()
        return waiter

    async def wait_headers(self) -> None:
        while not self._headers_done:
            await self._wakeup()

    async def read(self) -> bytes:
        """The whole body, taken as it arrives: a reader waiting for the end alone waited
        forever once the socket paused at the high-water mark (a body over 1 MiB), and
        no deadline fires while the proxy is the slow side."""
        pieces: list[bytes] = []
        while True:
            chunks = self._chunks
            if chunks:
                pieces += chunks
                taken = sum(map(len, chunks))  # (a generator: ~1k instructions more)
                chunks.clear()
                self._taken(taken)
            if self._done:
                return pieces[0] if len(pieces) == 1 else b"".join(pieces)
            await self._wakeup()

    async def readany(self) -> bytes:
        """What has arrived since the last call, waiting for something; b"" at the end."""
        while not self._chunks:
            if self._done:
                return b""
            await self._wakeup()
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._taken(len(data))
        return data

    def _taken(self, size: int) -> None:
        """The reader took ``size`` bytes: let the upstream send more."""

    def forget_headers(self) -> None:
        """The headers were passed on: a stream that stays open for minutes need not hold
        them (~600 bytes of every open stream)."""
        self.headers = CIMultiDict()

    # -- the read deadline

    def timed_out(self, now: float) -> None:
        """The deadline passed (the pool's check): fail, unless the proxy is the slow side
        (its client has not taken what came), which is not the upstream's fault."""
        raise NotImplementedError

    def _watch(self) -> None:
        self._watched = True
        self._deadlines.watch(self)

    def set_read_timeout(self, seconds: float) -> None:
        """From now on, the longest the upstream may stay silent (a response already
        read whole is not watched: nothing to do, on every small answer's path)."""
        self.read_timeout = seconds
        if self._watched:
            self.last_activity = self.loop.time()
            self._deadlines.watch(self)

    def _stop_watching(self) -> None:
        if self._watched:
            self._watched = False
            self._deadlines.unwatch(self)
