"""Runs kvtierd under cProfile: python _profiled_daemon.py OUT.prof -m kvtier.daemon.main -c CFG.

Profiling starts on SIGUSR1 (send it once the daemon serves and the bench has set up its data, so
that start-up is not in the profile) and stops when the daemon exits (SIGTERM); the stats are then
written to OUT.prof. Only the main thread is profiled: the asyncio event loop where every RPC handler
runs. The timer is the thread's CPU time, so time blocked in epoll waiting for the client is not
counted. Used by bench_lookup.py to show where a Lookup's time goes.
"""

import cProfile
import signal
import sys
import time

from kvtier.daemon import main as daemon_main

if __name__ == "__main__":
    out, rest = sys.argv[1], sys.argv[2:]
    if rest[:2] == ["-m", "kvtier.daemon.main"]:
        rest = rest[2:]
    profile = cProfile.Profile(time.thread_time)
    signal.signal(signal.SIGUSR1, lambda *_: profile.enable())
    try:
        code = daemon_main.main(rest)
    finally:
        profile.disable()
        profile.dump_stats(out)
    sys.exit(code)
