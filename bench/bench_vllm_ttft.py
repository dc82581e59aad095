"""TTFT of a real vLLM CPU engine: a kvtier hit vs recompute vs vLLM's ExampleConnector, plus the
kvtier connector's per-step cost when nothing hits (decode throughput).

Model: a random Llama generated offline (the tests' tokenizer from tests/connectors/_tiny_model.py,
widened/deepened so that prefilling a --prompt-tokens prompt costs seconds), float32, block 32.
Every engine is its own process (bench/_vllm_ttft_engine.py, in-process engine core,
PYTHONHASHSEED=0), started once and kept alive; all timings are taken inside the engine process
around `llm.generate(...)`, after a warm-up that runs the same shapes first. Five engines run side by
side, only one works at a time:

    none   no connector                        (recompute baseline, decode baseline)
    kvA    KvtierConnector, stores              kvB   KvtierConnector, a fresh engine that loads
    exA    ExampleConnector, stores             exB   ExampleConnector, a fresh engine that loads

Per repetition a new random prompt P (never seen by any engine): kvA and exA prefill P (their TTFT
is "store": miss + save), then none / kvB / exB each run P once, in an order rotated per repetition:
none recomputes it, kvB and exB have never seen P (empty local prefix cache for P) and load it from
kvtier / from ExampleConnector's files; then none runs P again: a hit in vLLM's own prefix cache, the
floor of any hit (same tokens left to compute, nothing to load), and kvB runs P again: the same local
hit with the kvtier connector in the engine. `num_cached_tokens` is checked for every run.
TTFT = `llm.generate([P], SamplingParams(max_tokens=1))`. Ratios of medians: recompute / kvtier hit
(goal >= 5) and ExampleConnector hit / kvtier hit (goal > 1).

Per-step overhead: rounds of `--decode-prompts` fresh prompts (never a hit; the kvtier engine still
looks them up and stores their full blocks, prompt and generated) x `--decode-tokens` tokens on none,
kvA and exA, interleaved (order rotated per round); output tokens/s of the whole generate, and CPU
time per output token (the engine process, plus kvtierd's CPU during the kvtier round), which other
load on the machine disturbs less than wall time; goal: kvtier >= 0.95 x no connector (median of the
per-round ratios).

Where the time goes: one more prompt is stored and loaded under cProfile in the engine processes
(and one decode round of kvA), the connector's functions are listed (`--no-profile` skips it).

Thread settings: all engines run with VLLM_CPU_OMP_THREADS_BIND=nobind and OMP_NUM_THREADS=--threads
(default 1). vLLM's default ("auto") binds differently with and without a kv_transfer_config (it
reserves one more core for a connector: on 2 cores the plain engine gets 1 OMP thread and a connector
engine 2), which would skew every comparison; and on a shared 2-core machine one unbound thread was
faster and steadier than two bound ones.

    .venv/bin/python bench/bench_vllm_ttft.py                 # 5-6 min on 2 cores
    .venv/bin/python bench/bench_vllm_ttft.py --reps 2 --decode-rounds 1 --prompt-tokens 2000 --no-profile
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import Row, add_common_args, human_bytes, log, median, work_dir, write_results

NAME = "vllm_ttft"
TITLE = "vLLM TTFT: kvtier hit vs recompute vs ExampleConnector (CPU engine)"
HERE = Path(__file__).resolve().parent
ENGINE = HERE / "_vllm_ttft_engine.py"
PAGE = 4096


# -- engines ----------------------------------------------------------------------------------------------
class Engine:
    """One engine process (see _vllm_ttft_engine.py): one JSON line per command, one per reply."""

    def __init__(self, name: str, spec: dict, env: dict, log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"engine-{name}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(ENGINE), json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
                                     cwd=str(log_dir))
        self.info: dict = {}

    def _read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            state = "timed out" if not ready else f"exited with {self.proc.poll()}"
            raise RuntimeError(f"engine {self.name} {state}; log tail:\n{self.log_tail()}")
        return json.loads(line)

    def wait_ready(self, timeout: float = 600) -> dict:
        self.info = self._read(timeout)
        return self.info

    def call(self, command: dict, timeout: float = 600) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def generate(self, prompts: list[list[int]], max_tokens: int = 1, profile: str | None = None) -> dict:
        command = {"cmd": "profile" if profile else "generate", "prompts": prompts, "max_tokens": max_tokens}
        if profile:
            command["path"] = profile
        return self.call(command)

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def memory(self) -> str:
        """Private (anonymous) RSS and mapped shared memory (the kvtier arena, tmpfs files) of the process."""
        fields = {}
        try:
            with open(f"/proc/{self.proc.pid}/status") as status:
                for line in status:
                    key, _, value = line.partition(":")
                    if key in ("RssAnon", "RssShmem", "RssFile"):
                        fields[key] = int(value.split()[0]) * 1024
        except OSError:
            return "?"
        return f"{human_bytes(fields.get('RssAnon', 0))} anon + {human_bytes(fields.get('RssShmem', 0))} shm"

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"cmd": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def engine_env(threads: int) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "OMP_NUM_THREADS": str(threads)}
    return env


def build_model(args, root: Path, env: dict) -> Path:
    """The random model, cached under <out>/tmp by its shape (building it takes ~20 s)."""
    shape = [args.hidden, args.layers, args.heads, args.kv_heads, args.head_dim, args.intermediate]
    path = root / ("vllm-ttft-model-" + "-".join(map(str, shape)))
    if (path / "model.safetensors").exists() and (path / "tokenizer.json").exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    log(f"building the random Llama {shape} in {path}")
    subprocess.run([sys.executable, str(ENGINE), "--build-model", str(path), *map(str, shape)], env=env,
                   check=True, capture_output=True, timeout=600)
    return path


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 2000) for _ in range(n)]


# -- the measurement ----------------------------------------------------------------------------------------
def measure(args, engines: dict[str, Engine], daemon) -> dict:
    none, kv_a, kv_b, ex_a, ex_b = (engines[n] for n in ("none", "kvA", "kvB", "exA", "exB"))
    bs, n = args.block_size, args.prompt_tokens
    hit_tokens = (n - 1) // bs * bs     # both connectors leave >= 1 token to compute (n % bs == 0 keeps them equal)
    seed = iter(range(1_000_000, 2_000_000))

    # Warm-up: the same shapes as the measurements (a 4000-token prefill, a hit's short prefill, decode batches).
    log("warm-up: one stored + loaded prompt per connector, one recompute, one decode batch per decode engine")
    warm = prompt(next(seed), n)
    warmup = []  # the first request of each engine (excluded from the results, reported)
    for engine in (kv_a, ex_a, none, kv_b, ex_b):
        reply = engine.generate([warm])
        warmup.append({"engine": engine.name, "TTFT s": reply["seconds"],
                       "cached": reply["outputs"][0]["num_cached_tokens"],
                       **{f"{k} ms": 1000 * v[1] for k, v in sorted(reply.get("connector", {}).items())
                          if v[1] >= 0.001}})
        if engine is kv_b:
            before = reply["stats"] or {}
    decode_warm = [prompt(next(seed), args.decode_prompt_tokens) for _ in range(args.decode_prompts)]
    for engine in (none, kv_a, ex_a):
        engine.generate([p[:] for p in decode_warm], max_tokens=4)
        decode_warm = [prompt(next(seed), args.decode_prompt_tokens) for _ in range(args.decode_prompts)]

    reps = []
    phases: dict[str, list[dict]] = {}  # mode -> per run {entry point: [calls, seconds]}
    measured = [("recompute", none), ("kvtier hit", kv_b), ("example hit", ex_b)]
    for rep in range(args.reps):
        p = prompt(next(seed), n)
        stores = [("kvtier store", kv_a), ("example store", ex_a)]
        order = stores[rep % 2:] + stores[:rep % 2] + measured[rep % 3:] + measured[:rep % 3]
        row: dict = {"rep": rep + 1, "order": ",".join(engine.name for _, engine in order)}
        tokens = {}
        for name, engine in order:
            reply = engine.generate([p])
            out = reply["outputs"][0]
            row[f"{name} s"] = reply["seconds"]
            row[f"{name} cached"] = out["num_cached_tokens"]
            if engine is not none:
                row[f"{name}: connector s"] = sum(seconds for _, seconds in reply["connector"].values())
                phases.setdefault(name, []).append(reply["connector"])
            tokens[name] = out["tokens"][0]
            if name == "kvtier hit":  # the worker's counters are cumulative
                stats = reply["stats"] or {}
                for key in ("loaded_blocks", "load_errors", "saved_blocks", "duplicate_blocks"):
                    row[f"kvB {key.replace('_', ' ')}"] = stats.get(key, 0) - before.get(key, 0)
                before = stats
        # The floor of any hit: vLLM's own prefix cache (none has just computed P), no connector at all;
        # and the same local hit in kvB (it has just loaded P): what the connector costs on a local hit.
        local = [("local hit", none), ("kvtier local hit", kv_b)]
        for name, engine in local[rep % 2:] + local[:rep % 2]:
            reply = engine.generate([p])
            row[f"{name} s"], row[f"{name} cached"] = reply["seconds"], reply["outputs"][0]["num_cached_tokens"]
            if engine is kv_b:
                row[f"{name}: connector s"] = sum(seconds for _, seconds in reply["connector"].values())
                phases.setdefault(name, []).append(reply["connector"])
                stats = reply["stats"] or {}
                row["kvB dup blocks (local hit)"] = stats.get("duplicate_blocks", 0) - before.get("duplicate_blocks", 0)
                before = stats
        row["same 1st token"] = len(set(tokens.values())) == 1
        reps.append(row)
        log(f"rep {rep + 1}/{args.reps}: recompute {row['recompute s']:.2f} s, kvtier hit {row['kvtier hit s']:.3f} s "
            f"({row['kvtier hit cached']} cached), example hit {row['example hit s']:.3f} s "
            f"({row['example hit cached']} cached), stores kvtier {row['kvtier store s']:.2f} s / example "
            f"{row['example store s']:.2f} s")

    # Decode rounds, interleaved.
    decode = []
    engines_decode = [("none", none), ("kvtier", kv_a)] + ([("example", ex_a)] if args.decode_example else [])
    for rnd in range(args.decode_rounds):
        row = {"round": rnd + 1}
        order = engines_decode[rnd % len(engines_decode):] + engines_decode[:rnd % len(engines_decode)]
        for name, engine in order:
            prompts = [prompt(next(seed), args.decode_prompt_tokens) for _ in range(args.decode_prompts)]
            daemon_cpu = daemon.cpu_seconds()
            reply = engine.generate(prompts, max_tokens=args.decode_tokens)
            daemon_cpu = daemon.cpu_seconds() - daemon_cpu if name == "kvtier" else 0.0
            generated = sum(len(o["tokens"]) for o in reply["outputs"])
            assert all(o["num_cached_tokens"] == 0 for o in reply["outputs"]), f"{name}: decode prompts hit"
            row[f"{name} tok/s"] = generated / reply["seconds"]
            row[f"{name} CPU ms/tok"] = 1000 * (reply["cpu_s"] + daemon_cpu) / generated
            if engine is not none:
                phases.setdefault(f"decode {name}", []).append(reply["connector"])
        row["kvtier / none"] = row["kvtier tok/s"] / row["none tok/s"]
        row["kvtier / none, CPU"] = row["none CPU ms/tok"] / row["kvtier CPU ms/tok"]
        if args.decode_example:
            row["example / none"] = row["example tok/s"] / row["none tok/s"]
            row["example / none, CPU"] = row["none CPU ms/tok"] / row["example CPU ms/tok"]
        decode.append(row)
        log(f"decode round {rnd + 1}/{args.decode_rounds}: " + ", ".join(
            f"{k} {v:.3g}" for k, v in row.items() if k != "round" and "/ none" in k))

    profiles = {}
    if args.profile:
        log("profiles: one more prompt stored and loaded under cProfile, one decode round of kvA")
        p = prompt(next(seed), n)
        prof_dir = Path(args.work) / "profiles"
        prof_dir.mkdir(exist_ok=True)
        for label, engine in (("kvtier store (kvA)", kv_a), ("kvtier hit (kvB)", kv_b),
                              ("example store (exA)", ex_a), ("example hit (exB)", ex_b)):
            reply = engine.generate([p], profile=str(prof_dir / f"{engine.name}-prefill.prof"))
            profiles[label] = {"seconds": reply["seconds"], **reply["profile"],
                               "cached": reply["outputs"][0]["num_cached_tokens"]}
        prompts = [prompt(next(seed), args.decode_prompt_tokens) for _ in range(args.decode_prompts)]
        reply = kv_a.generate(prompts, max_tokens=args.decode_tokens, profile=str(prof_dir / "kvA-decode.prof"))
        profiles["kvtier decode (kvA)"] = {"seconds": reply["seconds"], **reply["profile"]}
        reply = none.generate([prompt(next(seed), args.decode_prompt_tokens) for _ in range(args.decode_prompts)],
                              max_tokens=args.decode_tokens, profile=str(prof_dir / "none-decode.prof"))
        profiles["no-connector decode (none)"] = {"seconds": reply["seconds"], **reply["profile"]}
    return {"reps": reps, "decode": decode, "profiles": profiles, "hit_tokens": hit_tokens, "phases": phases,
            "warmup": warmup}


def phase_records(phases: dict[str, list[dict]]) -> list[dict]:
    """Median wall ms per run of each connector entry point, per mode (instrumented, no profiler)."""
    entries = sorted({e for runs in phases.values() for run in runs for e in run})
    records = []
    for entry in entries + ["total"]:
        record = {"entry point": entry}
        for mode, runs in phases.items():
            if entry == "total":
                values = [sum(s for _, s in run.values()) for run in runs]
            else:
                values = [run.get(entry, [0, 0.0])[1] for run in runs]
            calls = median([run.get(entry, [0, 0.0])[0] for run in runs]) if entry != "total" else ""
            record[f"{mode} ms"] = 1000 * median(values)
            record[f"{mode} calls"] = calls
        records.append(record)
    return records


def profile_records(profiles: dict, top: int) -> dict[str, list[dict]]:
    """Connector functions (cumulative) per profiled run, plus the hottest functions of the kvtier hit."""
    details = {}
    for label, prof in profiles.items():
        rows = [{"function": r["function"], "calls": r["calls"], "cum s": r["cumtime_s"],
                 "% of run": 100 * r["cumtime_s"] / prof["total_s"]} for r in prof["connector"][:top]]
        if rows:
            details[f"cProfile, {label}: connector functions (run {prof['seconds']:.3f} s; the connector's entry "
                    f"points, {prof['connector_calls']} calls, {prof['connector_s']:.4f} s = "
                    f"{100 * prof['connector_s'] / prof['total_s']:.2f} %)"] = rows
    for label in ("kvtier hit (kvB)", "example hit (exB)"):
        if label in profiles:
            prof = profiles[label]
            details[f"cProfile, {label}: hottest functions (self time)"] = [
                {"function": r["function"], "calls": r["calls"], "self s": r["tottime_s"], "cum s": r["cumtime_s"]}
                for r in prof["hottest"][:top]]
    return details


def profile_diff(path_a: str, path_b: str, top: int) -> list[dict]:
    """Functions with the largest extra self time in profile a (kvtier decode) vs b (no connector)."""
    import pstats

    def table(path):
        out = {}
        for (filename, line, name), (_cc, nc, tt, ct, _callers) in pstats.Stats(path).stats.items():  # noqa: SLF001
            out[f"{os.path.basename(filename)}:{line}({name})"] = (nc, tt, ct)
        return out
    a, b = table(path_a), table(path_b)
    rows = []
    for key, (nc, tt, ct) in a.items():
        nc_b, tt_b, ct_b = b.get(key, (0, 0.0, 0.0))
        rows.append({"function": key, "calls kvtier": nc, "calls none": nc_b, "self s kvtier": tt,
                     "self s none": tt_b, "extra self s": tt - tt_b})
    return sorted(rows, key=lambda r: -r["extra self s"])[:top]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=4000, help="tokens per TTFT prompt (default 4000)")
    parser.add_argument("--reps", type=int, default=7, help="TTFT prompts, each measured once per mode (default 7)")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--decode-prompts", type=int, default=8)
    parser.add_argument("--decode-prompt-tokens", type=int, default=96)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--decode-rounds", type=int, default=5)
    parser.add_argument("--no-decode-example", dest="decode_example", action="store_false",
                        help="skip ExampleConnector in the decode rounds")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per engine (default 1)")
    parser.add_argument("--example-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                        help="parent of ExampleConnector's storage dir (default /dev/shm: RAM, its best case)")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--profile-top", type=int, default=12)
    add_common_args(parser)
    args = parser.parse_args(argv)

    try:
        import vllm  # noqa: F401
    except ImportError as error:
        print(f"bench_vllm_ttft: needs vLLM ({error}); skipped", flush=True)
        return {"bench": NAME, "title": TITLE, "rows": [], "markdown": f"## {TITLE}\n\nSkipped: no vLLM.\n",
                "skipped": str(error)}
    from kvtier.client.process import DaemonProcess

    started = time.monotonic()
    root = work_dir(args.out)
    env = engine_env(args.threads)
    model = build_model(args, root, env)
    work = root / "vllm-ttft"  # engine logs and cProfile dumps stay here after the run
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    args.work = str(work)
    example_dir = tempfile.mkdtemp(prefix="kvt-bench-example-", dir=args.example_dir)

    bs = args.block_size
    block_bytes = bs * args.layers * 2 * args.kv_heads * args.head_dim * 4
    blocks_per_prompt = args.prompt_tokens // bs
    decode_blocks = -(-(args.decode_prompt_tokens + args.decode_tokens) // bs)
    stored_blocks = ((args.reps + 2) * blocks_per_prompt
                     + (args.decode_rounds + 2) * args.decode_prompts * decode_blocks)
    slot_bytes = -(-block_bytes // PAGE) * PAGE
    capacity = -(-int(stored_blocks * 1.25 + 16) * slot_bytes // (1 << 20)) * (1 << 20)
    max_len = -(-(args.prompt_tokens + 8) // bs) * bs
    engine_blocks = max(2 * blocks_per_prompt + 8, args.decode_prompts * decode_blocks + 8, 16)
    overrides = {"cpu.capacity": capacity, "cpu.slot_bytes": slot_bytes, "disk.enabled": False}
    params = {"model": f"Llama h{args.hidden} L{args.layers} heads {args.heads}/{args.kv_heads}x{args.head_dim} "
                       f"ffn {args.intermediate} fp32",
              "prompt_tokens": args.prompt_tokens, "block_size": bs, "block_bytes": human_bytes(block_bytes),
              "reps": args.reps, "decode": f"{args.decode_prompts}x({args.decode_prompt_tokens}+{args.decode_tokens})",
              "decode_rounds": args.decode_rounds, "omp_threads": args.threads,
              "daemon": f"cpu {human_bytes(capacity)}, slot {human_bytes(slot_bytes)}, disk off",
              "engine_kv_cache": human_bytes(engine_blocks * block_bytes)}
    log("params: " + ", ".join(f"{k}={v}" for k, v in params.items()))

    daemon = DaemonProcess(work, overrides, log_level="warning")
    engines: dict[str, Engine] = {}
    try:
        daemon.start()
        base = {"model": str(model), "block_size": bs, "max_model_len": max_len,
                "kv_cache_bytes": engine_blocks * block_bytes, "max_num_batched_tokens": max_len,
                "max_num_seqs": max(args.decode_prompts, 1)}
        specs = {"none": {}, "kvA": {"connector": "kvtier", "socket": daemon.socket},
                 "kvB": {"connector": "kvtier", "socket": daemon.socket},
                 "exA": {"connector": "example", "storage": example_dir},
                 "exB": {"connector": "example", "storage": example_dir}}
        for name, extra in specs.items():  # started together: their start-ups overlap
            engines[name] = Engine(name, {**base, **extra}, env, work)
        for name, engine in engines.items():
            info = engine.wait_ready()
            log(f"engine {name} ready in {info['startup_s']:.1f} s (pid {info['pid']})")
        result = measure(args, engines, daemon)
        rss = {name: e.memory() for name, e in engines.items()}
        daemon_cpu = daemon.cpu_seconds()
    finally:
        for engine in engines.values():
            engine.close()
        daemon.stop()
        daemon.cleanup()
        shutil.rmtree(example_dir, ignore_errors=True)

    reps, decode = result["reps"], result["decode"]
    med = {mode: median([r[f"{mode} s"] for r in reps])
           for mode in ("recompute", "kvtier hit", "example hit", "kvtier store", "example store", "local hit",
                        "kvtier local hit")}
    hit_tokens = result["hit_tokens"]
    hits_ok = (all(r["kvtier hit cached"] == hit_tokens and r["example hit cached"] == hit_tokens
                   and r["local hit cached"] == hit_tokens and r["kvtier local hit cached"] == hit_tokens
                   and r["recompute cached"] == 0 for r in reps))
    dec_none = median([r["none tok/s"] for r in decode])
    dec_kv = median([r["kvtier tok/s"] for r in decode])
    rows = [
        Row("TTFT, kvtier hit vs recompute", med["kvtier hit"], "s", med["recompute"], "recompute, no connector",
            ratio=med["recompute"] / med["kvtier hit"], goal=5, headline=True,
            notes=f"ratio = recompute / kvtier hit (x faster); {hit_tokens} of {args.prompt_tokens} tokens loaded"),
        Row("TTFT, kvtier hit vs ExampleConnector hit", med["kvtier hit"], "s", med["example hit"],
            "ExampleConnector hit", ratio=med["example hit"] / med["kvtier hit"], goal=1, headline=True,
            notes="ratio = ExampleConnector / kvtier (x faster); its files on tmpfs"),
        Row("TTFT, ExampleConnector hit vs recompute", med["example hit"], "s", med["recompute"],
            "recompute, no connector", ratio=med["recompute"] / med["example hit"], notes="informative"),
        Row("TTFT, kvtier hit vs vLLM's own prefix-cache hit", med["kvtier hit"], "s", med["local hit"],
            "local prefix-cache hit, no connector", ratio=med["local hit"] / med["kvtier hit"],
            notes="informative: the same tokens already in the engine's KV cache; 1 = loading is free"),
        Row("TTFT of a local prefix-cache hit, kvtier connector vs none", med["kvtier local hit"], "s",
            med["local hit"], "the same local hit, no connector", ratio=med["local hit"] / med["kvtier local hit"],
            goal=0.95, notes="the engine has the prompt in its own KV cache (kvB after loading it); "
                             "ratio = none / kvtier; 1 = the connector costs nothing"),
        Row("TTFT of a miss that stores, kvtier", med["kvtier store"], "s", med["recompute"],
            "recompute, no connector", ratio=med["recompute"] / med["kvtier store"],
            notes="ratio = recompute / (prefill + save); 1 = saving is free"),
        Row("TTFT of a miss that stores, ExampleConnector", med["example store"], "s", med["recompute"],
            "recompute, no connector", ratio=med["recompute"] / med["example store"], notes="informative"),
        Row("decode, kvtier connector vs none", dec_kv, "tok/s", dec_none, "no connector",
            ratio=median([r["kvtier / none"] for r in decode]), goal=0.95, headline=True,
            notes=f"{args.decode_prompts} never-hit prompts x {args.decode_tokens} tokens; ratio = median of "
                  "the per-round ratios (interleaved)"),
    ]
    rows.append(Row("decode CPU time, kvtier connector vs none", median([r["kvtier CPU ms/tok"] for r in decode]),
                    "CPU ms/tok", median([r["none CPU ms/tok"] for r in decode]), "no connector",
                    ratio=median([r["kvtier / none, CPU"] for r in decode]), goal=0.95,
                    notes="engine process CPU (+ kvtierd's CPU in the same interval) per output token; ratio = "
                          "none / kvtier; less sensitive to other load on the machine than wall time"))
    if args.decode_example:
        rows.append(Row("decode, ExampleConnector vs none", median([r["example tok/s"] for r in decode]), "tok/s",
                        dec_none, "no connector", ratio=median([r["example / none"] for r in decode]),
                        notes="informative: the cost of having any connector"))
    details = {"TTFT per repetition (seconds; cached = num_cached_tokens; kvB counters: this rep's hit)": reps,
               "decode rounds (output tokens/s of the whole generate; CPU ms per output token)": decode}
    details["first request of each engine (warm-up, excluded above): TTFT and connector entry points"] = \
        result["warmup"]
    details["connector entry points, wall ms per run (median; instrumented in the engine, no profiler)"] = \
        phase_records(result["phases"])
    details.update(profile_records(result["profiles"], args.profile_top))
    if args.profile:
        prof_dir = work / "profiles"
        kv, no = result["profiles"]["kvtier decode (kvA)"], result["profiles"]["no-connector decode (none)"]
        details[f"cProfile, decode round kvA ({kv['seconds']:.2f} s) vs none ({no['seconds']:.2f} s): largest extra "
                "self time with the kvtier connector"] = profile_diff(
            str(prof_dir / "kvA-decode.prof"), str(prof_dir / "none-decode.prof"), args.profile_top)
    notes = [
        f"Hits: every kvtier/ExampleConnector hit loaded {hit_tokens} tokens and every recompute 0: "
        f"{'yes' if hits_ok else 'NO (see the table)'}. kvB and exB never ran the prompt before (fresh engine, "
        "nothing local); one engine process per role, all alive, one working at a time.",
        "TTFT = llm.generate([prompt], max_tokens=1) timed inside the engine process (in-process engine core), "
        "after a warm-up of the same shapes. Medians over the repetitions.",
        f"kvtierd: CPU tier only (disk off), {daemon_cpu:.1f} CPU s used in all. ExampleConnector: safetensors per "
        f"layer and prompt in {args.example_dir} (tmpfs).",
        "Engines: VLLM_CPU_OMP_THREADS_BIND=nobind, OMP_NUM_THREADS=%d; vLLM's default auto-binding gives a "
        "connector engine a different number of OMP threads than a plain one on small machines." % args.threads,
        "Engine RSS at the end: " + ", ".join(f"{k} {v}" for k, v in rss.items()) + ".",
        f"Total wall time {time.monotonic() - started:.0f} s; profiles (cProfile dumps) in {work / 'profiles'}.",
    ]
    return write_results(NAME, TITLE, rows, params, args.out, details=details, notes=notes, plot=not args.no_plot)


if __name__ == "__main__":
    main()
