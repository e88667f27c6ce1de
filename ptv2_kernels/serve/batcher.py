"""Dynamic batching: concurrent submissions are gathered into one call of a batch function.

A batch closes when it holds ``max_batch_size`` items or ``timeout_s`` after its first item arrived,
whichever comes first; requests that queued while the previous batch ran join the next one at once.
One batch runs at a time, in one worker thread, so the event loop keeps accepting requests meanwhile
and the model is never called concurrently.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence

_STOP = object()


class Batcher:
    """``await submit(item)`` returns ``run(batch)[i]`` for the item's place ``i`` in its batch.

    ``run`` raising fails that batch's items with its exception; the next batch runs as usual.
    ``on_batch(items, seconds)`` is called after each batch (for metrics). :meth:`start` and
    :meth:`stop` run on the serving event loop; :meth:`stop` finishes every item already submitted."""

    def __init__(self, run: Callable[[Sequence], List], max_batch_size: int, timeout_s: float,
                 on_batch: Optional[Callable[[Sequence, float], None]] = None,
                 thread_init: Optional[Callable[[], None]] = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if timeout_s < 0:
            raise ValueError(f"timeout_s must be >= 0, got {timeout_s}")
        self.run, self.max_batch_size, self.timeout_s = run, max_batch_size, timeout_s
        self.on_batch = on_batch
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ptv2-batch", initializer=thread_init)
        self._queue: Optional[asyncio.Queue] = None
        self._task: Optional[asyncio.Task] = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Run what is queued, then end the loop and the worker thread."""
        self._queue.put_nowait(_STOP)
        await self._task
        self._executor.shutdown(wait=True)

    async def submit(self, item):
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _gather(self, first) -> tuple:
        """``(batch, stop)``: ``first`` and what arrives before the batch is full or times out."""
        loop = asyncio.get_running_loop()
        batch, deadline = [first], loop.time() + self.timeout_s
        while len(batch) < self.max_batch_size:
            try:
                nxt = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if nxt is _STOP:
                return batch, True
            batch.append(nxt)
        return batch, False

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        stop = False
        while not stop:
            first = await self._queue.get()
            if first is _STOP:
                break
            batch, stop = await self._gather(first)
            batch = [(item, fut) for item, fut in batch if not fut.done()]  # a client gone: not computed
            if not batch:
                continue
            items = [item for item, _ in batch]
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.run, items)
            except Exception as e:  # noqa: BLE001 - handed to every waiting request of this batch
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
            else:
                for (_, fut), result in zip(batch, results):
                    if not fut.done():
                        fut.set_result(result)
            if self.on_batch is not None:
                self.on_batch(items, time.perf_counter() - t0)
