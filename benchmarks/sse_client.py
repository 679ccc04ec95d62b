"""A minimal HTTP/1.1 streaming client for the load generator: one keep-alive connection per
client task, a POST with a JSON body, the chunked SSE response parsed straight off the socket.

Why not httpx: when the load generator shares a 2-core machine with the server, its CPU is taken
from the server. httpx (h11 state machine, decoders, line iterator) cost ~0.05 ms of client CPU
per output token here, ~5x this reader; a real deployment's clients run elsewhere, so the cheaper
the generator, the closer the measurement is to the server alone. Only what `aotlm serve` sends
is supported: a 200 with `Transfer-Encoding: chunked` or a `Content-Length` body.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from urllib.parse import urlsplit


class HTTPStatusError(RuntimeError):
    pass


class SSEConnection:
    """One keep-alive connection; `stream` yields the `data:` payloads of one request, parsed."""

    def __init__(self, base: str) -> None:
        url = urlsplit(base)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        return self.reader, self.writer

    async def stream(self, path: str, body: dict) -> AsyncIterator[dict]:
        reader, writer = await self._connect()
        payload = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        writer.write(head.encode() + payload)
        status, headers = _parse_head(await reader.readuntil(b"\r\n\r\n"))
        if headers.get("transfer-encoding") == "chunked":
            body_parts = _chunks(reader)
        else:
            body_parts = _fixed(reader, int(headers.get("content-length", "0")))
        if status != 200:
            text = b"".join([part async for part in body_parts]).decode(errors="replace")
            raise HTTPStatusError(f"HTTP {status}: {text[:500]}")
        pending = b""
        try:
            async for part in body_parts:
                pending += part
                *events, pending = pending.split(b"\n\n")
                for event in events:
                    if event.startswith(b"data: ") and event != b"data: [DONE]":
                        yield json.loads(event[6:])
        except BaseException:  # left mid-response: the connection cannot be reused
            writer.close()
            self.reader = self.writer = None
            raise
        if headers.get("connection") == "close":
            await self.close()

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()
            self.reader = self.writer = None


def _parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
    return status, headers


async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";", 1)[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers from uvicorn: the final CRLF
            return
        data = await reader.readexactly(size + 2)
        yield data[:-2]


async def _fixed(reader: asyncio.StreamReader, length: int) -> AsyncIterator[bytes]:
    if length:
        yield await reader.readexactly(length)
