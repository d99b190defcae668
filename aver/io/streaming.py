"""Small iterator helpers for streaming stages."""

from __future__ import annotations

import queue
import threading
from typing import Iterator


def prefetch(it: Iterator, depth: int = 2) -> Iterator:
    # Decoding (PyAV releases the GIL) overlaps detection of the previous chunk.
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def run() -> None:
        try:
            for x in it:
                q.put(x)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)
        q.put(done)

    threading.Thread(target=run, daemon=True).start()
    while True:
        x = q.get()
        if x is done:
            return
        if isinstance(x, BaseException):
            raise x
        yield x


def chunked(frames: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for f in frames:
        chunk.append(f)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
