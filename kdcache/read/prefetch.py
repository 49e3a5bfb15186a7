"""Background reading for `KDCacheDataset`: units loaded ahead by a thread pool, and an iterator run in a thread.

    units = UnitPrefetcher(load, part, window, depth=2)   # load(piece) -> anything; runs in the pool
    units.announce(np.array([3, 1]))                      # pieces in the order batches will need them
    units.need(np.array([3])); units.submit_ahead(); unit = units.get(3)
    units.release_before({0: 5})                          # partition 0 is at its window 5: drop its earlier pieces
    for item in in_background(lambda: produce(), maxsize=2):  # produce() runs in a daemon thread
        ...

Threads, not processes: fetching (fsspec), checksumming (hashlib) and Parquet decompression (Arrow) release the GIL.
A background iterator's thread is stopped and joined when its consumer closes it, and at interpreter exit for one
never closed (`it = iter(dataset); next(it)` at the end of a script): a daemon thread still inside Arrow or torch
while the interpreter finalizes aborts the process ("terminate called without an active exception").
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

__all__ = ["UnitPrefetcher", "in_background"]


class UnitPrefetcher:
    """Pieces of units loaded by a thread pool in first-use order, `depth` ahead of the consumer, released by window.

    `announce` appends pieces (in the order batches will need them), `need` marks pieces the current batch uses,
    `submit_ahead` starts loads up to `depth` pieces past the furthest needed one, `get` waits for one, and
    `release_before({part: w})` drops the pieces of partition `part` in windows before w (a piece belongs to one
    window of one partition, `piece_part` and `piece_window`; each partition's positions only move forward).
    `threads` (default `depth`) load in parallel, first-use order first: more threads than cores would only slow down
    the loads the next batch waits for.
    """

    def __init__(
        self,
        load: Callable[[int], Any],
        piece_part: np.ndarray,
        piece_window: np.ndarray,
        depth: int,
        threads: int | None = None,
    ):
        self._load, self._part, self._window, self._depth = load, piece_part, piece_window, depth
        workers = max(1, min(depth, threads or depth))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kdcache-unit") if depth > 0 else None
        self._stream: list[int] = []  # units in first-use order
        self._rank: dict[int, int] = {}  # unit -> index in _stream
        self._submitted = 0  # _stream[:_submitted] were submitted (or loaded)
        self._needed = -1  # furthest _stream index needed so far
        self._loaded: dict[int, Any] = {}

    def announce(self, units: np.ndarray) -> None:
        for u in units.tolist():
            if u not in self._rank:
                self._rank[u] = len(self._stream)
                self._stream.append(u)

    def need(self, units: np.ndarray) -> None:
        for u in units.tolist():
            self._needed = max(self._needed, self._rank[u])

    def lookahead(self) -> int:
        """Announced units past the furthest needed one."""
        return len(self._stream) - 1 - self._needed

    def submit_ahead(self) -> None:
        stop = min(len(self._stream), self._needed + 1 + self._depth)
        for u in self._stream[self._submitted : stop]:
            self._loaded[u] = self._pool.submit(self._load, u) if self._pool is not None else self._load(u)
        self._submitted = max(self._submitted, stop)

    def get(self, unit: int) -> Any:
        value = self._loaded[unit]
        if isinstance(value, Future):
            value = self._loaded[unit] = value.result()
        return value

    def release_before(self, windows: dict[int, int]) -> None:
        done = [u for u in self._loaded if self._window[u] < windows.get(int(self._part[u]), -1)]
        for u in done:
            value = self._loaded.pop(u)
            if isinstance(value, Future):
                value.cancel()

    def close(self) -> None:
        self._loaded.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


_JOIN_S = 30.0  # how long closing waits for the thread to finish the item it is producing
_running: weakref.WeakKeyDictionary[threading.Thread, threading.Event] = weakref.WeakKeyDictionary()


@atexit.register
def _stop_all() -> None:
    """Stop and join every background iterator still running (atexit runs before daemon threads are frozen)."""
    threads = list(_running.items())
    for _, stop in threads:
        stop.set()
    for thread, _ in threads:
        thread.join(_JOIN_S)


def in_background(make: Callable[[], Iterator[Any]], maxsize: int) -> Iterator[Any]:
    """Run the iterator `make()` in a daemon thread, `maxsize` items ahead; errors re-raise in the consumer.

    Closing the returned generator (or the interpreter's exit) stops the thread after the item it is producing and
    waits for it (at most `_JOIN_S` seconds)."""
    items: queue.Queue = queue.Queue(maxsize)
    stop = threading.Event()

    def put(entry: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        source = make()
        try:
            for item in source:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as exc:  # handed to the consumer, which raises it
            put(("error", exc))
        finally:
            source.close()

    thread = threading.Thread(target=run, name="kdcache-batches", daemon=True)
    _running[thread] = stop
    thread.start()
    try:
        while True:
            kind, item = items.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        if thread is not threading.current_thread():
            thread.join(_JOIN_S)
        _running.pop(thread, None)
