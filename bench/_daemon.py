"""kvtierd for benchmarks: kvtier.client.process.DaemonProcess with a fresh data dir that is removed
afterwards (config and log kept only when the run failed), quieter logs, and one retry when the
daemon dies during start-up (seen once on a loaded 2-core VM).

    with BenchDaemon(work_dir, {"cpu.capacity": "1GiB", "disk.enabled": False}) as d:
        with d.client() as c: ...
"""

from __future__ import annotations

import shutil
from pathlib import Path
import sys

from kvtier.client.process import DaemonProcess


class BenchDaemon(DaemonProcess):
    def __init__(self, work_dir, overrides: dict | None = None, name: str = "kvtierd", keep: bool = False,
                 python_args: list[str] | None = None):
        data_dir = Path(work_dir) / f"{name}-data"
        shutil.rmtree(data_dir, ignore_errors=True)  # every bench starts from an empty store
        super().__init__(work_dir, overrides, name=name, log_level="warning", python_args=python_args)
        self.keep = keep

    def __enter__(self) -> "BenchDaemon":
        try:
            try:
                return self.start()
            except RuntimeError as exc:
                print(f"[bench] WARNING: {str(exc).splitlines()[0]} (log: {self.log_path}); retrying once",
                      file=sys.stderr, flush=True)
                return self.start()
        except BaseException:
            self.kill()
            self.cleanup(remove_data=not self.keep)
            raise

    def __exit__(self, exc_type, *exc) -> None:
        code = None
        try:
            code = self.stop()
        finally:
            self.cleanup(remove_data=not self.keep)
            if exc_type is None and code == 0 and not self.keep:
                for path in (self.config, self.log_path):
                    path.unlink(missing_ok=True)
