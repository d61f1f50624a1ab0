"""cProfile for the server process and its workers, asked for by environment variables so that a
benchmark can profile the processes it starts (`warmserve bench serve --profile-server` and
`--profile-worker`): where their CPU time goes under load."""

from __future__ import annotations

import contextlib

SERVER_PROFILE_ENV = "WARMSERVE_PROFILE"  # the path the server's statistics go to
# A path prefix: each worker writes PREFIX.worker<id> when it stops.
WORKER_PROFILE_ENV = "WARMSERVE_PROFILE_WORKER"


@contextlib.contextmanager
def profiled(stats_path: str | None):
    """Runs the block under cProfile and writes its statistics to `stats_path` (None: no
    profile); python -m pstats reads them."""
    if not stats_path:
        yield
        return
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        profiler.dump_stats(stats_path)
