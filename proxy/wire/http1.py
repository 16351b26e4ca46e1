"""A small HTTP/1.1 client for the upstream hop, on asyncio protocols and llhttp (httptools).

aiohttp's client took about a third of the proxy's CPU per request: per request it builds a
request object, payload objects, a writer, a stream reader and a timer, for features a proxy
never uses (cookies, redirects, decompression, proxies, auto headers). This client sends a
request's head and body in one write, parses the response with llhttp, and hands body chunks
over as they arrive, with back-pressure both ways. Connections are kept alive per origin.

Timeouts are lazy: a data chunk only records the time, and one timer per pool checks every
response's deadline (``deadlines``), so a stream of small frames reschedules no timer.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

from .deadlines import ReadDeadlines
from .reading import ArrivingResponse

# Body bytes buffered before the socket stops being read (until the reader takes them).
_HIGH_WATER = 1024 * 1024
# A body written in the same write as the head up to this size (one syscall, no copy after).
_COALESCE = 64 * 1024
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
# A response head larger than this is refused (llhttp itself sets no limit).
MAX_HEAD = 64 * 1024

Body = bytes | list[bytes] | AsyncIterator[bytes] | None


class UpstreamError(Exception):
    """The upstream hop failed; the message says how, for the client's error."""


class ConnectTimeout(UpstreamError):
    pass


class ConnectFailed(UpstreamError):
    pass


class ReadTimeout(UpstreamError):
    """No byte arrived within the read timeout (before headers: the first-byte timeout)."""


class ConnectionClosed(UpstreamError):
    """The connection closed, or sent something that is not HTTP, before the response ended."""


@dataclass(frozen=True, slots=True)
class Origin:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, origin: str) -> Origin:
        parts = urlsplit(origin)
        tls = parts.scheme == "https"
        return cls(parts.hostname or "", parts.port or (443 if tls else 80), tls)


@functools.lru_cache(maxsize=256)
def origin_of(origin: str) -> Origin:
    """``Origin.parse``, once per origin (a pool looks it up per request)."""
    return Origin.parse(origin)


class Pool:
    """Keep-alive connections per origin; ``request`` returns once the headers are in."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        keepalive_timeout: float = 30.0,
        limit_per_host: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive_timeout = keepalive_timeout
        self._limit = limit_per_host
        self._ssl = ssl_context
        # Per origin, idle connections oldest first: a dict as an ordered set, so taking the
        # newest, expiring the oldest and dropping a closed one are all O(1) with thousands.
        self._idle: dict[Origin, dict[_Connection, None]] = {}
        self._slots: dict[Origin, asyncio.Semaphore] = {}
        self._all: set[_Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        # Read deadlines of the responses waiting on the upstream: one timer for all.
        self.deadlines = ReadDeadlines()
        self._closed = False
        # host -> (expiry, addresses): a new connection must not wait for getaddrinfo.
        self._dns: dict[str, tuple[float, list[str]]] = {}
        self.dns_ttl = 60.0
        self._outbox: list[tuple[_Connection, bytes | list[bytes]]] = []

    @property
    def open_connections(self) -> int:
        return len(self._all)

    async def request(
        self,
        method: str,
        origin: str,
        target: str,
        headers: dict[str, str],
        body: Body = None,
        read_timeout: float | None = None,
    ) -> Response:
        """Send ``method target`` with exactly these headers (plus framing) and this body.

        A kept-alive connection the upstream closed just as it was reused fails before a
        byte comes back; an idempotent request with a replayable body is then sent once
        more on a new connection (as aiohttp and botocore do). Others fail: a POST may
        have been received."""
        key = origin_of(origin)
        timeout = self.read_timeout if read_timeout is None else read_timeout
        head, chunked = _head(method, target, headers, body)
        may_retry = method in _IDEMPOTENT and (body is None or isinstance(body, bytes | list))
        slot = await self._take_slot(key)
        while True:
            try:
                connection = self._reuse(key)
                reused = connection is not None
                if connection is None:
                    connection = await self._connect(key)
            except BaseException:
                if slot is not None:
                    slot.release()
                raise
            response = Response(connection, method, timeout, slot)
            response.chunked_request = chunked
            try:
                connection.send(response, head, body)
                await response.wait_headers()
                return response
            except ConnectionClosed:
                if reused and may_retry and not response.received:
                    may_retry = False
                    response.close(keep_slot=True)
                    continue
                response.close()
                raise
            except BaseException:
                response.close()
                raise

    async def _take_slot(self, key: Origin) -> asyncio.Semaphore | None:
        if not self._limit:
            return None
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = asyncio.Semaphore(self._limit)
        await slot.acquire()
        return slot

    def _reuse(self, key: Origin) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            connection, _ = idle.popitem()
            if connection.reusable:
                return connection
            connection.abort()
        return None

    async def _connect(self, key: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        context = None
        if key.tls:
            context = self._ssl or default_ssl_context()
        failure: BaseException | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                for address in await self._resolve(key.host, key.port):
                    try:
                        _, connection = await loop.create_connection(
                            lambda: _Connection(self, key),
                            address,
                            key.port,
                            ssl=context,
                            server_hostname=key.host if context is not None else None,
                        )
                        return connection
                    except (OSError, ssl.SSLError) as exc:
                        failure = exc  # try the next address
        except TimeoutError:
            raise ConnectTimeout(
                f"Timed out connecting to the upstream service after {self.connect_timeout:g} s"
            ) from None
        self._dns.pop(key.host, None)  # every address failed: look the name up again
        reason = type(failure).__name__ if failure is not None else "no address"
        raise ConnectFailed(f"Cannot connect to the upstream service ({reason})") from None

    async def _resolve(self, host: str, port: int) -> list[str]:
        """The host's addresses, cached for ``dns_ttl`` seconds (an IP literal is itself)."""
        now = time.monotonic()
        cached = self._dns.get(host)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            ipaddress.ip_address(host)
            addresses = [host]
        except ValueError:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_STREAM
                )
            except OSError as exc:
                raise ConnectFailed(
                    f"Cannot resolve the upstream host {host!r} ({type(exc).__name__})"
                ) from None
            addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        self._dns[host] = (now + self.dns_ttl, addresses)
        return addresses

    # -- bookkeeping, called by connections

    def write_soon(self, connection: _Connection, data: bytes | list[bytes]) -> None:
        """Write a whole request at the end of this turn of the loop, with the others.

        Written at once, every request of a turn reaches an upstream that is still awake
        from the first; written one at a time, between the Python work of the next, each
        found a local upstream asleep and woke it, at the writer's expense (the bench's
        nginx: 0.85 wake-ups per request, 0.12 batched; the serving thread's system time
        per governed request fell from 37 to 30 us)."""
        if not self._outbox:
            connection.loop.call_soon(self._flush)
        self._outbox.append((connection, data))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        for connection, data in outbox:
            transport = connection.transport
            if connection.closed or transport is None or transport.is_closing():
                continue  # connection_lost has failed or will fail its response
            try:
                if isinstance(data, bytes):
                    transport.write(data)
                else:
                    transport.writelines(data)
            except Exception as exc:  # the connection is unusable: as if the upstream closed it
                response = connection.response
                if response is not None:  # the type only: uvloop's text holds an address
                    failed = f"Writing to the upstream failed ({type(exc).__name__})"
                    response.fail(ConnectionClosed(failed))
                connection.abort()

    def opened(self, connection: _Connection) -> None:
        self._all.add(connection)

    def release(self, connection: _Connection) -> None:
        if self._closed or not connection.reusable:
            connection.abort()
            return
        loop = connection.loop
        connection.idle_since = loop.time()
        self._idle.setdefault(connection.key, {})[connection] = None
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.keepalive_timeout, self._sweep)

    def lost(self, connection: _Connection) -> None:
        self._all.discard(connection)
        idle = self._idle.get(connection.key)
        if idle:
            idle.pop(connection, None)

    def _sweep(self) -> None:
        """Close connections idle past the keep-alive timeout, oldest first."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self.keepalive_timeout
        waiting = False
        for idle in self._idle.values():
            while idle:
                oldest = next(iter(idle))
                if oldest.idle_since > cutoff:
                    break
                del idle[oldest]
                oldest.abort()
            waiting = waiting or bool(idle)
        if waiting:
            self._sweeper = loop.call_later(self.keepalive_timeout / 2, self._sweep)

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self.deadlines.close()
        for connection in list(self._all):
            connection.abort()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run their close callbacks


_contexts: dict[str | None, ssl.SSLContext] = {}


def default_ssl_context() -> ssl.SSLContext:
    """The system trust store, or ``AWS_CA_BUNDLE`` as botocore reads it."""
    cafile = os.environ.get("AWS_CA_BUNDLE") or None
    context = _contexts.get(cafile)
    if context is None:
        context = _contexts[cafile] = ssl.create_default_context(cafile=cafile)
    return context


def _head(method: str, target: str, headers: dict[str, str], body: Body) -> tuple[bytes, bool]:
    """The request line and headers, and whether the body must be sent chunked."""
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    for name, value in headers.items():
        if "\n" in value or "\r" in value:
            raise ValueError(f"header {name!r} has a line break in its value")
        lines.append(f"{name}: {value}\r\n")
    chunked = False
    if "content-length" not in headers:
        if isinstance(body, bytes):
            if body:
                lines.append(f"content-length: {len(body)}\r\n")
        elif isinstance(body, list):
            lines.append(f"content-length: {sum(map(len, body))}\r\n")
        elif body is not None:
            lines.append("transfer-encoding: chunked\r\n")
            chunked = True
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape"), chunked


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one request at a time."""

    __slots__ = (
        "_drain",
        "_write_paused",
        "closed",
        "idle_since",
        "key",
        "loop",
        "pool",
        "response",
        "transport",
    )

    def __init__(self, pool: Pool, key: Origin) -> None:
        self.pool = pool
        self.key = key
        # The loop that made the connection, for its responses' timers: asking asyncio for
        # the running loop costs a getpid() system call each time.
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self.response: Response | None = None
        self.closed = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None

    @property
    def reusable(self) -> bool:
        transport = self.transport
        return not self.closed and transport is not None and not transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # TCP_NODELAY is already set: asyncio and uvloop both set it on TCP transports.
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses
        self.pool.opened(self)

    def send(self, response: Response, head: bytes, body: Body) -> None:
        transport = self.transport
        assert transport is not None
        self.response = response
        if body is None or isinstance(body, bytes):
            if body and len(body) <= _COALESCE:
                self.pool.write_soon(self, head + body)
            elif body:
                self.pool.write_soon(self, [head, body])
            else:
                self.pool.write_soon(self, head)
            response.body_sent = True
        elif isinstance(body, list):
            self.pool.write_soon(self, [head, *body])
            response.body_sent = True
        else:
            transport.write(head)
            response.sender = asyncio.ensure_future(self._send_stream(response, body))

    async def _send_stream(self, response: Response, body: AsyncIterator[bytes]) -> None:
        """Write a streamed body with back-pressure, chunked unless a length was given."""
        chunked = response.chunked_request
        try:
            async for chunk in body:
                if not chunk:
                    continue
                if self.closed or self.transport is None:
                    return
                if chunked:
                    self.transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    self.transport.write(chunk)
                response.touch()
                if self._write_paused:
                    await self._wait_drain()
            if chunked and not self.closed and self.transport is not None:
                self.transport.write(b"0\r\n\r\n")
            response.body_sent = True
        except asyncio.CancelledError:
            raise
        except ConnectionClosed:
            return  # the response side reports it
        except BaseException as exc:
            response.fail(exc)
            self.abort()

    async def _wait_drain(self) -> None:
        loop = asyncio.get_running_loop()
        self._drain = loop.create_future()
        try:
            await self._drain
        finally:
            self._drain = None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # bytes nobody asked for: the connection is not safe to reuse
            self.abort()
            return
        response.feed(data)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.lost(self)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionClosed("The upstream closed the connection"))
        response = self.response
        if response is not None:
            response.connection_lost()

    def finished(self, response: Response, keep_alive: bool) -> None:
        """The response was read to its end (or abandoned); pool or close the connection."""
        if self.response is not response:
            return
        self.response = None
        if keep_alive and self.reusable:
            self.pool.release(self)
        else:
            self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class Response(ArrivingResponse):
    """Status and headers at once; the body as it arrives, by ``readany`` or ``read``."""

    __slots__ = (
        "_buffered",
        "_connection",
        "_head_bytes",
        "_head_only",
        "_keep_alive",
        "_parser",
        "_raw_headers",
        "_reading_paused",
        "_released",
        "_slot",
        "_until_eof",
        "body_sent",
        "chunked_request",
        "received",
        "sender",
    )

    def __init__(
        self,
        connection: _Connection,
        method: str,
        read_timeout: float,
        slot: asyncio.Semaphore | None,
    ) -> None:
        super().__init__(connection.loop, connection.pool.deadlines, read_timeout)
        self._connection = connection
        self._slot = slot
        # The parser holds this response's bound methods, a reference cycle: it is dropped
        # once the response is complete or released, so the response is freed when its
        # last reference goes instead of by the cycle collector (which, left to it, spent
        # ~1.3 ms per collection on these under load).
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._head_only = method == "HEAD"
        self._raw_headers: list[tuple[str, str]] = []
        self.chunked_request = False
        self.body_sent = False
        self.received = False
        self._head_bytes = 0
        self.sender: asyncio.Future[None] | None = None
        self._buffered = 0
        self._reading_paused = False
        self._until_eof = False
        self._keep_alive = False
        self._released = False
        self._watch()

    # -- llhttp callbacks

    def on_message_begin(self) -> None:
        if self._headers_done:  # a second response on one request: never reuse this
            self._keep_alive = False
            raise ConnectionClosed("The upstream sent more than one response")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        assert self._parser is not None  # called by the parser itself
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # interim response: the real one follows
            self._raw_headers.clear()
            return
        self.status = status
        self.headers = headers = CIMultiDict(self._raw_headers)
        self._raw_headers.clear()  # the pairs are in ``headers`` now (trailers may follow)
        length = headers.get("Content-Length")
        if length is not None and length.isdigit():
            self.content_length = int(length)
        self._headers_done = True
        if self._head_only:
            self._complete()
        elif (
            length is None
            and "chunked" not in headers.get("Transfer-Encoding", "").lower()
            and status not in (204, 304)
        ):
            self._until_eof = True  # the body ends when the connection does
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._done:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._reading_paused:
            transport = self._connection.transport
            if transport is not None:
                transport.pause_reading()
                self._reading_paused = True
        self._wake()

    def on_message_complete(self) -> None:
        if self._headers_done:
            self._complete()

    # -- connection events

    def feed(self, data: bytes) -> None:
        self.received = True
        self.last_activity = self.loop.time()
        parser = self._parser
        if self._done or parser is None:
            self._connection.abort()  # bytes past the end of the response
            return
        try:
            parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self.fail(ConnectionClosed("The upstream sent a response that is not valid HTTP"))
            self._connection.abort()
            return
        if not self._headers_done:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self.fail(ConnectionClosed("The upstream sent a response head over 64 KiB"))
                self._connection.abort()

    def touch(self) -> None:
        self.last_activity = self.loop.time()

    def connection_lost(self) -> None:
        if self._done:
            return
        if self._until_eof:
            self._complete(keep_alive=False)
        elif not self._headers_done:
            self.fail(ConnectionClosed("The upstream closed the connection before responding"))
        else:
            self.fail(ConnectionClosed("The upstream closed the connection mid-response"))

    def _complete(self, keep_alive: bool | None = None) -> None:
        if self._done:  # a HEAD response completes at its headers, then again at its end
            return
        self._done = True
        if keep_alive is None:
            keep_alive = self._parser is not None and self._parser.should_keep_alive()
        self._keep_alive = keep_alive
        self._parser = None
        self._stop_watching()
        self._wake()

    # -- timeouts

    def timed_out(self, now: float) -> None:
        if self._reading_paused:  # the client has not taken what came: it is the slow side
            self.last_activity = now
            return
        self.fail(ReadTimeout(f"The upstream sent nothing for {self.read_timeout:g} s"))
        self._connection.abort()

    # -- reading

    def _taken(self, size: int) -> None:
        self._buffered = 0
        if self._reading_paused:
            self._reading_paused = False
            transport = self._connection.transport
            if transport is not None:
                transport.resume_reading()

    # -- the end

    def release(self) -> None:
        """Done with the response: the connection goes back to the pool if it can."""
        if self._released:
            return
        self._released = True
        self._parser = None
        self._stop_watching()
        reusable = self._done and self._keep_alive and self._error is None and self.body_sent
        if self.sender is not None and not self.sender.done():
            self.sender.cancel()
            reusable = False
        if self._reading_paused:
            reusable = False
        self._connection.finished(self, reusable)
        if self._slot is not None:
            self._slot.release()

    def finish(self, read_whole: bool) -> None:
        """The caller is done: a response read whole goes back to the pool (``release``),
        any other is abandoned with its connection (``close``)."""
        if read_whole:
            self.release()
        else:
            self.close()

    def close(self, keep_slot: bool = False) -> None:
        """Abandon the response and its connection (its pool slot too, unless kept for a
        retry)."""
        if not self._done:
            self._error = self._error or ConnectionClosed("The response was abandoned")
        self._keep_alive = False
        if keep_slot:
            self._slot = None
        self.release()
