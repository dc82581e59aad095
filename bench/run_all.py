"""Runs every kvtier benchmark and writes bench/out/{shm,disk,lookup,s3,gpu,peer}.{json,md,png} plus summary.{md,json}.
The vLLM TTFT benchmark (bench_vllm_ttft.py) runs on its own: it needs minutes and the engine stack.

    .venv/bin/python bench/run_all.py               # shm, disk, lookup, s3, gpu, peer at default sizes (a few minutes on 2 cores)
    .venv/bin/python bench/run_all.py --only lookup
    .venv/bin/python bench/run_all.py --quick       # smaller sizes, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from _common import DEFAULT_OUT, dict_table, env_info, fmt, goal_text, Row

BENCHES = ("shm", "disk", "lookup", "s3", "gpu", "peer")
QUICK = {"shm": ["--rounds", "4"], "disk": ["--total", "256MiB"], "lookup": ["--seconds", "1", "--sweep", "1024"],
         "s3": ["--total", "32MiB", "--rounds", "1"], "gpu": ["--blocks", "16", "--rounds", "2"],
         "peer": ["--rounds", "4", "--pull-rounds", "3"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output dir (default bench/out)")
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of " + ",".join(BENCHES))
    parser.add_argument("--quick", action="store_true", help="smaller sizes and shorter runs")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    chosen = [b for b in args.only.split(",") if b]
    unknown = set(chosen) - set(BENCHES)
    if unknown:
        parser.error(f"unknown bench(es): {', '.join(sorted(unknown))}")

    common = ["--out", args.out] + (["--no-plot"] if args.no_plot else [])
    results, failures, seconds = {}, {}, {}
    for name in chosen:
        module = __import__(f"bench_{name}")
        print(f"\n===== bench_{name} =====", flush=True)
        start = time.perf_counter()
        try:
            results[name] = module.main(common + (QUICK[name] if args.quick else []))
        except Exception:  # keep going: one broken bench must not hide the others' results
            failures[name] = traceback.format_exc()
            print(failures[name], file=sys.stderr, flush=True)
        seconds[name] = time.perf_counter() - start

    summary = render_summary(results, failures, seconds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(summary)
    (out / "summary.json").write_text(json.dumps(
        {"env": env_info(), "seconds": seconds, "failures": failures,
         "rows": {name: data["rows"] for name, data in results.items()}}, indent=2, default=str) + "\n")
    print("\n" + summary, flush=True)
    return 1 if failures else 0


def render_summary(results: dict, failures: dict, seconds: dict) -> str:
    env = env_info()
    lines = ["# kvtier benchmark summary", "",
             f"Machine: {env['cpu']}, {env['cores']} cores, Linux {env['kernel']}, Python {env['python']}; "
             f"code {env['code']}; load average {env['load']} at the end; {env['time']}.", "",
             "| bench | result | measured | limit (same run) | ratio | goal |",
             "|---|---|---:|---|---:|---|"]
    for name, data in results.items():
        for raw in data["rows"]:
            row = Row(**{k: v for k, v in raw.items() if k != "met"})
            label = f"**{row.name}**" if row.headline else row.name
            limit = f"{fmt(row.limit)} {row.unit} ({row.limit_name})" if row.limit else "-"
            lines.append(f"| {name} | {label} | {fmt(row.value)} {row.unit} | {limit} | {fmt(row.ratio)} | "
                         f"{goal_text(row)} |")
    lines += ["", dict_table([{"bench": n, "seconds": round(s, 1), "status": "FAILED" if n in failures else "ok"}
                              for n, s in seconds.items()])]
    for name, data in results.items():
        lines += ["", data["markdown"].replace("## ", "## bench_" + name + ": ", 1)]
    for name, trace in failures.items():
        lines += ["", f"## bench_{name}: FAILED", "", "```", trace.rstrip(), "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
