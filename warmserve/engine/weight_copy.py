"""A load's weight copy to the device while it runs, and what waits for it.

From host memory registered for DMA the copy is issued on the copy stream and returns at once.
From memory that is not registered yet (a segment the worker has only just been told of) or
still being read from disk, each copy call holds its caller until its bytes are on the device;
such a copy runs in a thread, so that the worker's loop goes on stepping the models it already
serves while the new one's weights arrive (the thread releases the GIL inside the copies).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch


class WeightCopy:
    def __init__(self, stream: torch.cuda.Stream, copy: Callable[[], None], in_thread: bool):
        """Runs `copy` on `stream`: at once (it only issues asynchronous copies), or in a
        thread."""
        self.event = torch.cuda.Event()
        self.error: BaseException | None = None
        self._after: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._issued = not in_thread  # under the lock: the host is done with the source
        self._thread: threading.Thread | None = None
        if in_thread:
            self._thread = threading.Thread(target=self._run, args=(stream, copy), daemon=True)
            self._thread.start()
        else:
            self._issue(stream, copy)

    def _issue(self, stream: torch.cuda.Stream, copy: Callable[[], None]) -> None:
        with torch.cuda.device(stream.device), torch.cuda.stream(stream):
            copy()
            self.event.record(stream)

    def _run(self, stream: torch.cuda.Stream, copy: Callable[[], None]) -> None:
        try:
            self._issue(stream, copy)
        except BaseException as error:  # reported to the first step that waits for the copy
            self.error = error
        finally:
            with self._lock:
                self._issued = True
                after, self._after = self._after, []
            for callback in after:
                callback()

    def then(self, callback: Callable[[], None]) -> None:
        """Calls `callback` once the host is done with the source (the copy issued): at once
        for an issued copy, when the thread ends for a threaded one."""
        with self._lock:
            if not self._issued:
                self._after.append(callback)
                return
        callback()

    def query(self) -> bool:
        """Whether the copy is over on the device."""
        return self._issued and self.event.query()

    def synchronize(self) -> None:
        self._join()
        self.event.synchronize()

    def order_before(self, stream: torch.cuda.Stream) -> None:
        """Makes `stream`'s later work wait for the copy (the host waits only for a threaded
        copy to be issued)."""
        self._join()
        stream.wait_event(self.event)

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"the weight copy failed: {self.error}") from self.error
