"""A small asyncio HTTP/1.1 client for driving a local server in tests and the load benchmark: one
keep-alive connection per concurrent worker, no dependency beyond the standard library."""

from __future__ import annotations

import asyncio
import json
import time
from typing import List, Sequence, Tuple


class Connection:
    """One keep-alive connection to ``host:port``."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes = b"") -> Tuple[int, bytes]:
        """``(status, body)`` of one request (reconnecting when the server closed the connection)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split()[1])
        length, close = 0, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
            elif name.strip().lower() == "connection" and value.strip().lower() == "close":
                close = True
        data = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except ConnectionError:
                pass
        self.reader = self.writer = None


async def post_all(host: str, port: int, bodies: Sequence[dict], concurrency: int,
                   path: str = "/predict") -> List[Tuple[int, dict, float]]:
    """POST every body as JSON with ``concurrency`` connections at once; ``(status, answer, seconds)``
    per body, in order."""
    results: List = [None] * len(bodies)
    next_index = iter(range(len(bodies)))

    async def worker():
        conn = Connection(host, port)
        try:
            for i in next_index:
                t0 = time.perf_counter()
                status, data = await conn.request("POST", path, json.dumps(bodies[i]).encode())
                results[i] = (status, json.loads(data), time.perf_counter() - t0)
        finally:
            await conn.close()

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(bodies)))))
    return results
