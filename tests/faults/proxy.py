"""A TCP proxy for fault tests: forwards bytes both ways and can delay each chunk.

Runs its own event loop in a thread so synchronous tests can put it between two processes
(advertise the proxy's port as a service's endpoint). ``delay_up_s`` delays chunks going to
the upstream (requests), ``delay_down_s`` chunks coming back (responses); ``reset`` closes
every new connection at once, as a peer that always resets would.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable


class DelayProxy:
    """Forwards 127.0.0.1:<port> to upstream(), with optional per-chunk delays."""

    def __init__(self, upstream: Callable[[], tuple[str, int]]) -> None:
        self._upstream = upstream
        self.delay_up_s = 0.0
        self.delay_down_s = 0.0
        self.reset = False
        self.connections = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> DelayProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop
        ).result(5)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.reset:
            writer.transport.abort()
            return
        try:
            host, port = self._upstream()
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.transport.abort()
            return
        await asyncio.gather(
            self._pump(reader, up_writer, lambda: self.delay_up_s),
            self._pump(up_reader, writer, lambda: self.delay_down_s),
        )

    async def _pump(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        delay: Callable[[], float],
    ) -> None:
        try:
            while chunk := await src.read(65536):
                if delay() > 0:
                    await asyncio.sleep(delay())  # the injected slowness
                dst.write(chunk)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.close()

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
