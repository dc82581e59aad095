"""Shared helpers for the kvtier benchmarks: result rows, JSON + Markdown (+ PNG) output, timing.

Every result row carries the measured value, the physical limit measured in the same run (same
process, same bytes, interleaved with the measurement where possible) and their ratio, so that
results from noisy machines stay comparable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "out"

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30,
          "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_size(text: str) -> int:
    """'1GiB', '512MiB', '2M', '4096' -> bytes."""
    text = str(text).strip()
    digits = text.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    unit = text[len(digits):].strip().lower()
    if not digits or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size like 1GiB or 512MiB, got {text!r}")
    return int(float(digits) * _UNITS[unit])


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n:g} B"


@dataclasses.dataclass
class Row:
    """One result: `value` against `limit` (same unit, same run); higher is better for both."""
    name: str
    value: float
    unit: str
    limit: float | None = None
    limit_name: str = ""
    ratio: float | None = None
    goal: float | None = None        # a ratio goal (goal_on="ratio") or an absolute one (goal_on="value")
    goal_on: str = "ratio"
    headline: bool = False
    notes: str = ""

    def __post_init__(self):
        if self.ratio is None and self.limit:
            self.ratio = self.value / self.limit

    @property
    def met(self) -> bool | None:
        if self.goal is None:
            return None
        measured = self.ratio if self.goal_on == "ratio" else self.value
        return None if measured is None else measured >= self.goal

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["met"] = self.met
        return out


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def goal_text(row: Row) -> str:
    if row.goal is None:
        return "-"
    target = f"ratio >= {row.goal:g}" if row.goal_on == "ratio" else f">= {fmt(row.goal)} {row.unit}"
    return f"{'met' if row.met else 'NOT met'} ({target})"


def rows_table(rows: list[Row]) -> str:
    lines = ["| result | measured | limit (same run) | ratio | goal | notes |",
             "|---|---:|---|---:|---|---|"]
    for r in rows:
        name = f"**{r.name}**" if r.headline else r.name
        limit = f"{fmt(r.limit)} {r.unit} ({r.limit_name})" if r.limit else (r.limit_name or "-")
        lines.append(f"| {name} | {fmt(r.value)} {r.unit} | {limit} | {fmt(r.ratio)} | {goal_text(r)} | {r.notes} |")
    return "\n".join(lines)


def dict_table(records: list[dict]) -> str:
    if not records:
        return ""
    columns = list(records[0])
    for rec in records[1:]:
        columns += [c for c in rec if c not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for rec in records:
        lines.append("| " + " | ".join(fmt(rec.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def env_info() -> dict:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import numpy
        numpy_version = numpy.__version__
    except ImportError:
        numpy_version = "?"
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "numpy": numpy_version, "code": code_version(),
            "load": "%.2f %.2f %.2f" % os.getloadavg(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def code_version() -> str:
    """The commit under test, and '+ local changes' when files outside bench/ differ from it."""
    import subprocess
    root = BENCH_DIR.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD") or "no commit"
        dirty = [line for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
                 if not line[3:].startswith("bench/")]
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (f" + local changes in {len(dirty)} file(s)" if dirty else "")


def render_markdown(title: str, rows: list[Row], params: dict, details: dict[str, list[dict]] | None,
                    notes: list[str] | None) -> str:
    env = env_info()
    parts = [f"## {title}", "",
             f"Machine: {env['cpu']}, {env['cores']} cores, Linux {env['kernel']}, Python {env['python']}, "
             f"numpy {env['numpy']}; code {env['code']}; load average {env['load']} when written; "
             f"{env['time']}.", "",
             "Parameters: " + ", ".join(f"`{k}={v}`" for k, v in params.items()), "",
             rows_table(rows)]
    for name, records in (details or {}).items():
        if records:
            parts += ["", f"**{name}**", "", dict_table(records)]
    if notes:
        parts += [""] + [f"- {n}" for n in notes]
    return "\n".join(parts) + "\n"


def plot_rows(path: Path, title: str, rows: list[Row]) -> bool:
    """Bar chart of ratio vs the same-run limit for every row that has one. False if matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = [r for r in rows if r.ratio is not None]
    if not shown:
        return False
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(shown) + 1.6))
    names = [r.name for r in shown][::-1]
    ratios = [r.ratio for r in shown][::-1]
    colors = ["tab:green" if r.met else ("tab:red" if r.met is False else "tab:gray") for r in shown][::-1]
    bars = ax.barh(names, ratios, color=colors)
    for bar, r in zip(bars, shown[::-1]):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                f" {fmt(r.value)} / {fmt(r.limit)} {r.unit}", va="center", fontsize=8)
    goals = {r.goal for r in shown if r.goal is not None and r.goal_on == "ratio"}
    for goal in goals:
        ax.axvline(goal, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("measured / limit measured in the same run")
    ax.set_xlim(0, max(1.2, max(ratios) * 1.45))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(name: str, title: str, rows: list[Row], params: dict, out_dir: Path | str = DEFAULT_OUT,
                  details: dict[str, list[dict]] | None = None, notes: list[str] | None = None,
                  plot: bool = True) -> dict:
    """Writes out_dir/<name>.json, <name>.md (and <name>.png), prints the Markdown; returns the JSON data."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(title, rows, params, details, notes)
    data = {"bench": name, "title": title, "env": env_info(), "params": params,
            "rows": [r.as_dict() for r in rows], "details": details or {}, "notes": notes or [],
            "markdown": markdown}
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (out / f"{name}.md").write_text(markdown)
    if plot and plot_rows(out / f"{name}.png", title, rows):
        data["png"] = str(out / f"{name}.png")
    print(markdown, flush=True)
    return data


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output dir for JSON/Markdown/PNG (default bench/out)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")


def work_dir(out_dir: str | Path) -> Path:
    """Scratch dir for data dirs and raw files: <out>/tmp (same file system as the daemon's data dir)."""
    path = Path(out_dir) / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def median(values) -> float:
    return statistics.median(values)


class Timer:
    """Accumulates wall time per named phase: with timer("copy"): ..."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self._name = ""
        self._start = 0.0

    def __call__(self, name: str) -> "Timer":
        self._name = name
        return self

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.totals[self._name] = self.totals.get(self._name, 0.0) + time.perf_counter() - self._start


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)
