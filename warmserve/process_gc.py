"""The cyclic garbage collector in the long-running processes (the server, each worker).

A full collection walks every object the collector tracks. After start-up most of those are
imported modules, torch's and Triton's state, the app's routes: they live as long as the
process, and walking them made each full collection a pause of milliseconds in the token
stream. Frozen, they are left out of every collection (vLLM freezes its heap after start-up for
the same reason). Reference counting still frees them; only cycles among them would stay.
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Once the process is started: collects, then freezes what is left."""
    gc.collect()
    gc.freeze()
