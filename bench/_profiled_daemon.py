"""Runs kvtierd under cProfile, imports excluded: python _profiled_daemon.py OUT.prof -m kvtier.daemon.main -c CFG.

Only the main thread (the asyncio event loop, where every RPC handler runs) is profiled; the stats
are written when the daemon exits (SIGTERM). Used by bench_lookup.py to show where a Lookup's time goes.
"""

import cProfile
import sys

from kvtier.daemon import main as daemon_main

if __name__ == "__main__":
    out, rest = sys.argv[1], sys.argv[2:]
    if rest[:2] == ["-m", "kvtier.daemon.main"]:
        rest = rest[2:]
    profile = cProfile.Profile()
    profile.enable()
    try:
        code = daemon_main.main(rest)
    finally:
        profile.disable()
        profile.dump_stats(out)
    sys.exit(code)
