"""TTFT of a real vLLM CPU engine: a kvtier hit vs recompute vs vLLM's ExampleConnector, plus the
kvtier connector's per-step cost when nothing hits (decode throughput), its asynchronous paths
(background lookups, async loads and saves) against the old synchronous ones, and a hung daemon.

Model: a random Llama generated offline (the tests' tokenizer from tests/connectors/_tiny_model.py,
widened/deepened so that prefilling a --prompt-tokens prompt costs seconds), float32, block 32.
Every engine is its own process (bench/_vllm_ttft_engine.py, in-process engine core,
PYTHONHASHSEED=0), started once and kept alive; all timings are taken inside the engine process
around `llm.generate(...)`, after a warm-up that runs the same shapes first. Six engines run side by
side, only one works at a time:

    none   no connector                        (recompute baseline, decode baseline)
    kvA    KvtierConnector, stores              kvB   KvtierConnector, a fresh engine that loads
    exA    ExampleConnector, stores             exB   ExampleConnector, a fresh engine that loads
    kvS    KvtierConnector on the old synchronous path: kv_connector_extra_config
           {"background_lookups": false, "async_loads": false, "async_saves": false} (--no-sync: not started)

kvA and kvB run the connector's defaults: lookups in the background (the scheduler hears "not known
yet" until the daemon answers), loads while the request waits in WAITING_FOR_REMOTE_KVS, saves copied
and committed on a background thread after the step. Before another engine looks a stored prompt up,
the storing engine is settled (its worker's `_transfers.wait_idle`: every background save committed);
that wait is reported as "save drain" and is not part of any TTFT.

Per repetition a new random prompt P (never seen by any engine) and, with kvS, a second one Q: kvA and
exA prefill P and kvS prefills Q (their TTFT is "store": miss + save; kvS saves inside the step), in
an order rotated per repetition; then none / kvB / exB / kvS each run P once, rotated: none
recomputes it, kvB, exB and kvS have never seen P (empty local prefix cache for P) and load it from
kvtier (kvB asynchronously, kvS synchronously) / from ExampleConnector's files; then none runs P
again: a hit in vLLM's own prefix cache, the floor of any hit (same tokens left to compute, nothing to
load), and kvB runs P again: the same local hit with the kvtier connector in the engine.
`num_cached_tokens` is checked for every run. TTFT = `llm.generate([P], SamplingParams(max_tokens=1))`.
Ratios of medians: recompute / kvtier hit (goal >= 5), ExampleConnector hit / kvtier hit (goal > 1),
recompute / kvtier store (goal >= 0.98: saving must not delay the first token), synchronous hit /
asynchronous hit (> 1: asynchronous loads serve TTFT better).

Per-step overhead: rounds of `--decode-prompts` fresh prompts (never a hit; the kvtier engines still
look them up and store their full blocks, prompt and generated: decode while saving) x
`--decode-tokens` tokens on none, kvA, kvS and exA, interleaved (order rotated per round); output
tokens/s of the whole generate, and CPU time per output token (the engine process, plus kvtierd's CPU
during a kvtier round, both including the save drain after the generate), which other load on the
machine disturbs less than wall time; goal: kvtier >= 0.95 x no connector (median of the per-round
ratios); asynchronous / synchronous is reported per round too.

Hung daemon (`--no-hung` skips it): kvtierd is SIGSTOPped (always SIGCONTed again, in a finally), then
a short prompt (no full block: the connector never asks the daemon), a fresh --hung-prompt-tokens
prompt (looked up and stored), a second fresh one and a second short one run on kvA, on kvS
(unless --no-hung-sync) and on none. With background lookups and the circuit breaker the first
fresh prompt should cost about one scheduler deadline (scheduler_timeout_s, 1 s by default) over none
and the later ones about nothing. After SIGCONT: the time until every breaker closed again, then a
fresh prompt stored by kvA and loaded by kvB (and kvS): the engines keep working.

Where the time goes: one more prompt is stored and loaded under cProfile in the engine processes
(and one decode round of kvA), the connector's functions are listed (`--no-profile` skips it).

Thread settings: all engines run with VLLM_CPU_OMP_THREADS_BIND=nobind and OMP_NUM_THREADS=--threads
(default 1). vLLM's default ("auto") binds differently with and without a kv_transfer_config (it
reserves one more core for a connector: on 2 cores the plain engine gets 1 OMP thread and a connector
engine 2), which would skew every comparison; and on a shared 2-core machine one unbound thread was
faster and steadier than two bound ones.

    .venv-sys/bin/python bench/bench_vllm_ttft.py                 # 4-5 min on 2 cores (+20 s: the model, once)
    .venv-sys/bin/python bench/bench_vllm_ttft.py --reps 2 --decode-rounds 1 --prompt-tokens 2000 --no-profile
    .venv-sys/bin/python bench/bench_vllm_ttft.py --no-sync --no-hung   # the original five engines only
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import Row, add_common_args, human_bytes, log, median, work_dir, write_results

NAME = "vllm_ttft"
TITLE = "vLLM TTFT: kvtier hit vs recompute vs ExampleConnector, async vs sync connector (CPU engine)"
HERE = Path(__file__).resolve().parent
ENGINE = HERE / "_vllm_ttft_engine.py"
PAGE = 4096
# kv_connector_extra_config of kvS: the connector's old synchronous path.
SYNC_CONFIG = {"background_lookups": False, "async_loads": False, "async_saves": False}


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

    def settle(self, timeout: float = 120.0) -> dict:
        """Waits until the kvtier worker's background saves (and loads) ended; raises if they did not."""
        reply = self.call({"cmd": "settle", "timeout": timeout}, timeout=timeout + 60)
        if reply["idle"] is False:
            raise RuntimeError(f"engine {self.name}: background transfers still running after {timeout} s; "
                               f"stats {reply['stats']}; log tail:\n{self.log_tail()}")
        return reply

    def state(self) -> dict:
        return self.call({"cmd": "state"}, timeout=60)

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


def connector_sources() -> str:
    """Short digests of the connector's sources as the engines import them (they are edited while benches
    run: this says which version a result belongs to)."""
    import hashlib
    out = []
    for name in ("vllm.py", "_transfers.py", "_pipeline.py", "_daemon.py", "_layout.py"):
        path = HERE.parent / "connectors" / name
        if path.exists():
            out.append(f"{name}:{hashlib.sha256(path.read_bytes()).hexdigest()[:8]}")
    return " ".join(out)


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 2000) for _ in range(n)]


# -- the measurement ----------------------------------------------------------------------------------------
KVTIER = ("kvA", "kvB", "kvS")  # the engines with the kvtier connector (one daemon)


def rotate(items: list, k: int) -> list:
    k %= max(len(items), 1)
    return items[k:] + items[:k]


class Counters:
    """The kvtier worker counters of each engine as last seen; delta() says what changed since."""

    def __init__(self):
        self.last: dict[str, dict] = {}

    def delta(self, engine: "Engine", reply: dict, keys: tuple[str, ...]) -> dict[str, int]:
        stats = reply.get("stats") or {}
        before = self.last.get(engine.name, {})
        self.last[engine.name] = stats
        return {key: stats.get(key, 0) - before.get(key, 0) for key in keys}


def thread_times(row: dict, name: str, reply: dict, add: bool = False) -> None:
    """The engine steps of a kvtier run (the worker's get_finished calls: one per step) and the wall time
    of its lookups, load jobs and save jobs (background threads, or inline on the synchronous path)."""
    if not add:
        row[f"{name}: steps"] = (reply.get("connector") or {}).get("get_finished", [0, 0.0])[0]
    for func, label in (("_lookup", "lookup"), ("_load", "load job"), ("_save", "save job")):
        calls, seconds = (reply.get("threads") or {}).get(func, [0, 0.0])
        if calls:
            key = f"{name}: {label} s"
            row[key] = row.get(key, 0.0) + seconds


def measure(args, engines: dict[str, Engine], daemon) -> dict:
    none, kv_a, kv_b, ex_a, ex_b = (engines[n] for n in ("none", "kvA", "kvB", "exA", "exB"))
    kv_s = engines.get("kvS")
    bs, n = args.block_size, args.prompt_tokens
    hit_tokens = (n - 1) // bs * bs     # both connectors leave >= 1 token to compute (n % bs == 0 keeps them equal)
    seed = iter(range(1_000_000, 2_000_000))
    counters = Counters()

    # Warm-up: the same shapes as the measurements (a 4000-token prefill, a hit's short prefill, decode batches).
    log("warm-up: one stored + loaded prompt per connector (kvS: one synchronous store and load), one recompute, "
        "one decode batch per decode engine")
    warm = prompt(next(seed), n)
    warmup = []  # the first request of each engine (excluded from the results, reported)

    def warm_run(engine: Engine, tokens: list[int], label: str) -> None:
        reply = engine.generate([tokens])
        warmup.append({"engine": label, "TTFT s": reply["seconds"],
                       "cached": reply["outputs"][0]["num_cached_tokens"],
                       **{f"{k} ms": 1000 * v[1] for k, v in sorted(reply.get("connector", {}).items())
                          if v[1] >= 0.001}})
        if engine.name in KVTIER:
            counters.delta(engine, engine.settle(), ())
    for engine in (kv_a, ex_a):
        warm_run(engine, warm, engine.name)
    for engine in (none, kv_b, ex_b) + ((kv_s,) if kv_s else ()):
        warm_run(engine, warm, engine.name + (" (sync load)" if engine is kv_s else ""))
    if kv_s:
        warm_run(kv_s, prompt(next(seed), n), "kvS (sync store)")
    decode_engines = [none, kv_a] + ([kv_s] if kv_s else []) + ([ex_a] if args.decode_example else [])
    for engine in decode_engines:
        engine.generate([prompt(next(seed), args.decode_prompt_tokens) for _ in range(args.decode_prompts)],
                        max_tokens=4)
        if engine.name in KVTIER:
            counters.delta(engine, engine.settle(), ())

    reps = []
    phases: dict[str, list[dict]] = {}  # mode -> per run {entry point: [calls, seconds]}
    measured = [("recompute", none), ("kvtier hit", kv_b), ("example hit", ex_b)]
    if kv_s:
        measured.append(("kvtier sync hit", kv_s))
    load_keys = ("loaded_blocks", "load_errors")
    save_keys = ("saved_blocks", "duplicate_blocks", "save_errors", "dropped_save_blocks")
    for rep in range(args.reps):
        p = prompt(next(seed), n)
        q = prompt(next(seed), n)  # kvS stores its own prompt: it must not have P locally when it loads P
        stores = [("kvtier store", kv_a, p), ("example store", ex_a, p)]
        if kv_s:
            stores.append(("kvtier sync store", kv_s, q))
        order = [(name, engine, tokens) for name, engine, tokens in rotate(stores, rep)]
        order += [(name, engine, p) for name, engine in rotate(measured, rep)]
        row: dict = {"rep": rep + 1, "order": ",".join(engine.name for _, engine, _ in order)}
        tokens_out = {}
        for name, engine, tokens in order:
            reply = engine.generate([tokens])
            out = reply["outputs"][0]
            row[f"{name} s"] = reply["seconds"]
            row[f"{name} cached"] = out["num_cached_tokens"]
            if engine is not none:
                row[f"{name}: connector s"] = sum(seconds for _, seconds in reply["connector"].values())
                phases.setdefault(name, []).append(reply["connector"])
            if tokens is p:
                tokens_out[name] = out["tokens"][0]
            if engine.name in KVTIER:
                thread_times(row, name, reply)
                # Before anyone looks P up: every background save of it committed (kvA); and no save left
                # running into the next engine's measurement. The counters then include those saves.
                settle = engine.settle()
                row[f"{name}: save drain s"] = settle["seconds"]
                thread_times(row, name, settle, add=True)
                wanted = load_keys if name.endswith("hit") else ("saved_blocks",)
                for key, value in counters.delta(engine, settle, load_keys + save_keys).items():
                    if value or key in wanted:
                        row[f"{name}: {key.replace('_', ' ')}"] = value
        # The floor of any hit: vLLM's own prefix cache (none has just computed P), no connector at all;
        # and the same local hit in kvB (it has just loaded P): what the connector costs on a local hit.
        local = [("local hit", none), ("kvtier local hit", kv_b)]
        for name, engine in rotate(local, rep):
            reply = engine.generate([p])
            row[f"{name} s"], row[f"{name} cached"] = reply["seconds"], reply["outputs"][0]["num_cached_tokens"]
            if engine is kv_b:
                row[f"{name}: connector s"] = sum(seconds for _, seconds in reply["connector"].values())
                phases.setdefault(name, []).append(reply["connector"])
                thread_times(row, name, reply)
                settle = engine.settle()
                row[f"{name}: save drain s"] = settle["seconds"]
                thread_times(row, name, settle, add=True)
                delta = counters.delta(engine, settle, save_keys)
                row[f"{name}: saved blocks"] = delta["saved_blocks"]
                row[f"{name}: duplicate blocks"] = delta["duplicate_blocks"]
        row["same 1st token"] = len(set(tokens_out.values())) == 1
        reps.append(row)
        log(f"rep {rep + 1}/{args.reps}: recompute {row['recompute s']:.2f} s, kvtier hit {row['kvtier hit s']:.3f} s "
            f"({row['kvtier hit cached']} cached)"
            + (f", sync hit {row['kvtier sync hit s']:.3f} s ({row['kvtier sync hit cached']} cached)" if kv_s else "")
            + f", example hit {row['example hit s']:.3f} s ({row['example hit cached']} cached), stores kvtier "
            f"{row['kvtier store s']:.2f} s (drain {row['kvtier store: save drain s']:.3f} s)"
            + (f" / sync {row['kvtier sync store s']:.2f} s" if kv_s else "")
            + f" / example {row['example store s']:.2f} s")

    # Decode rounds, interleaved.
    decode = []
    engines_decode = [("none", none), ("kvtier", kv_a)] + ([("kvtier sync", kv_s)] if kv_s else []) \
        + ([("example", ex_a)] if args.decode_example else [])
    for rnd in range(args.decode_rounds):
        row = {"round": rnd + 1}
        for name, engine in rotate(engines_decode, rnd):
            prompts = [prompt(next(seed), args.decode_prompt_tokens) for _ in range(args.decode_prompts)]
            daemon_cpu = daemon.cpu_seconds()
            reply = engine.generate(prompts, max_tokens=args.decode_tokens)
            generated = sum(len(o["tokens"]) for o in reply["outputs"])
            assert all(o["num_cached_tokens"] == 0 for o in reply["outputs"]), f"{name}: decode prompts hit"
            cpu = reply["cpu_s"]
            if engine.name in KVTIER:
                settle = engine.settle()  # the saves left after the generate: not in tok/s, in CPU ms/tok
                cpu += settle["cpu_s"] + daemon.cpu_seconds() - daemon_cpu
                row[f"{name} drain ms"] = 1000 * settle["seconds"]
                saved = counters.delta(engine, settle, ("saved_blocks", "duplicate_blocks", "dropped_save_blocks",
                                                        "save_errors"))
                row[f"{name} saved blocks"] = saved["saved_blocks"]
                if saved["dropped_save_blocks"] or saved["save_errors"]:
                    row[f"{name} NOT saved"] = saved["dropped_save_blocks"] + saved["save_errors"]
            row[f"{name} tok/s"] = generated / reply["seconds"]
            row[f"{name} CPU ms/tok"] = 1000 * cpu / generated
            if engine is not none:
                phases.setdefault(f"decode {name}", []).append(reply["connector"])
        for name, _ in engines_decode[1:]:
            row[f"{name} / none"] = row[f"{name} tok/s"] / row["none tok/s"]
            row[f"{name} / none, CPU"] = row["none CPU ms/tok"] / row[f"{name} CPU ms/tok"]
        if kv_s:
            row["kvtier / kvtier sync"] = row["kvtier tok/s"] / row["kvtier sync tok/s"]
            row["kvtier / kvtier sync, CPU"] = row["kvtier sync CPU ms/tok"] / row["kvtier CPU ms/tok"]
        decode.append(row)
        log(f"decode round {rnd + 1}/{args.decode_rounds}: " + ", ".join(
            f"{k} {v:.3g}" for k, v in row.items() if " / " in k))

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
            if engine.name in KVTIER:
                counters.delta(engine, engine.settle(), ())
        prompts = [prompt(next(seed), args.decode_prompt_tokens) for _ in range(args.decode_prompts)]
        reply = kv_a.generate(prompts, max_tokens=args.decode_tokens, profile=str(prof_dir / "kvA-decode.prof"))
        profiles["kvtier decode (kvA)"] = {"seconds": reply["seconds"], **reply["profile"]}
        counters.delta(kv_a, kv_a.settle(), ())
        reply = none.generate([prompt(next(seed), args.decode_prompt_tokens) for _ in range(args.decode_prompts)],
                              max_tokens=args.decode_tokens, profile=str(prof_dir / "none-decode.prof"))
        profiles["no-connector decode (none)"] = {"seconds": reply["seconds"], **reply["profile"]}

    hung = hung_daemon(args, engines, daemon, seed) if args.hung else None
    return {"reps": reps, "decode": decode, "profiles": profiles, "hit_tokens": hit_tokens, "phases": phases,
            "warmup": warmup, "hung": hung}


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as file:
        return file.read().rsplit(")", 1)[1].split()[0]


def wait_stopped(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while process_state(pid) not in ("T", "t"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"kvtierd (pid {pid}) did not stop within {timeout} s")
        time.sleep(0.01)


BREAKER_KEYS = ("breaker_opened", "breaker_closed", "short_circuited", "daemon_failures", "daemon_timeouts",
                "health_probes")


def hung_daemon(args, engines: dict[str, Engine], daemon, seed) -> dict:
    """kvtierd SIGSTOPped: a short prompt, two fresh ones and a short one on kvA (kvS) and none; SIGCONT in
    a finally; then how long the breakers take to close, and a store on kvA loaded by kvB (and kvS)."""
    none, kv_a, kv_b, kv_s = engines["none"], engines["kvA"], engines["kvB"], engines.get("kvS")
    subjects = [("kvtier", kv_a)] + ([("kvtier sync", kv_s)] if kv_s and args.hung_sync else [])
    config = kv_a.state()["config"] or {}
    deadline_s = float(config.get("scheduler_timeout_s") or 1.0)
    period_s = float(config.get("breaker_period_s") or 5.0)
    short = [prompt(next(seed), args.hung_short_tokens) for _ in range(2)]
    fresh = [prompt(next(seed), args.hung_prompt_tokens) for _ in range(2)]
    sequence = [("short 1", short[0]), ("fresh 1", fresh[0]), ("fresh 2", fresh[1]), ("short 2", short[1])]
    before = {engine.name: engine.state() for _, engine in subjects}
    records = []
    log(f"hung daemon: SIGSTOP kvtierd (pid {daemon.pid}); scheduler deadline {deadline_s:g} s, breaker period "
        f"{period_s:g} s")
    stopped_s = 0.0
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        wait_stopped(daemon.pid)
        stopped = time.monotonic()
        for label, tokens in sequence:
            record: dict = {"prompt": label, "tokens": len(tokens)}
            for name, engine in [("none", none)] + subjects:
                reply = engine.generate([tokens])
                record[f"{name} s"] = reply["seconds"]
                record[f"{name} cached"] = reply["outputs"][0]["num_cached_tokens"]
            for name, _ in subjects:
                record[f"{name} extra s"] = record[f"{name} s"] - record["none s"]
            records.append(record)
            log(f"hung daemon, {label}: " + ", ".join(f"{k} {v:.3f}" for k, v in record.items() if k.endswith(" s")))
        stopped_s = time.monotonic() - stopped
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    continued = time.monotonic()
    log("hung daemon: SIGCONT; waiting for the breakers to close")

    # The breakers close on their own (a health probe every breaker_period_s); the saves that hung time out.
    closed_s = None
    states: dict[str, dict] = {}
    while time.monotonic() - continued < max(30.0, 4 * period_s):
        states = {engine.name: engine.state() for _, engine in subjects}
        if not any((st.get(side) or {}).get("breaker_open") for st in states.values()
                   for side in ("stats", "scheduler_stats")):
            closed_s = time.monotonic() - continued
            break
        time.sleep(0.1)
    breakers = []
    for name, engine in subjects:
        settle = engine.settle()
        for side, label in (("scheduler_stats", "scheduler"), ("stats", "worker")):
            now, then = settle.get(side) or {}, before[engine.name].get(side) or {}
            keys = BREAKER_KEYS + (("lookups", "lookup_errors") if side == "scheduler_stats"
                                   else ("saved_blocks", "save_errors", "dropped_save_blocks"))
            breakers.append({"engine": engine.name, "side": label, "breaker open now": now.get("breaker_open"),
                             **{key: now.get(key, 0) - then.get(key, 0) for key in keys}})

    # The engines keep working: a fresh prompt stored by kvA, loaded by kvB (and kvS), recomputed by none.
    r = prompt(next(seed), args.hung_prompt_tokens)
    expect = (len(r) - 1) // args.block_size * args.block_size
    after = {}
    for label, engine in [("kvA store", kv_a), ("none recompute", none), ("kvB hit", kv_b)] + \
            ([("kvS sync hit", kv_s)] if kv_s else []):
        reply = engine.generate([r])
        after[f"{label} s"] = reply["seconds"]
        after[f"{label} cached"] = reply["outputs"][0]["num_cached_tokens"]
        if engine is kv_a:
            after["kvA saved blocks"] = (engine.settle()["stats"] or {}).get("saved_blocks", 0) - \
                (states.get("kvA", {}).get("stats") or {}).get("saved_blocks", 0)
    after["expected cached"] = expect
    after["recovered"] = (after["kvA store cached"] == 0 and after["none recompute cached"] == 0
                          and after["kvB hit cached"] == expect
                          and (kv_s is None or after["kvS sync hit cached"] == expect))
    log(f"hung daemon: breakers closed {closed_s if closed_s is None else round(closed_s, 2)} s after SIGCONT; "
        f"after it: " + ", ".join(f"{k} {v}" for k, v in after.items()))
    return {"records": records, "breakers": breakers, "after": after, "closed_s": closed_s, "stopped_s": stopped_s,
            "deadline_s": deadline_s, "period_s": period_s, "subjects": [name for name, _ in subjects]}


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
    parser.add_argument("--no-sync", dest="sync", action="store_false",
                        help="no kvS engine (the connector's old synchronous path): no async-vs-sync rows")
    parser.add_argument("--no-hung", dest="hung", action="store_false", help="skip the hung-daemon (SIGSTOP) part")
    parser.add_argument("--no-hung-sync", dest="hung_sync", action="store_false",
                        help="the hung-daemon part without kvS (it costs one save deadline, 5 s, there)")
    parser.add_argument("--hung-prompt-tokens", type=int, default=1024,
                        help="tokens of the fresh prompts of the hung-daemon part (default 1024)")
    parser.add_argument("--hung-short-tokens", type=int, default=16,
                        help="tokens of its short prompts (default 16: no full block, never looked up)")
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="diagnostic: sys.setswitchinterval(S) in every engine (Python's default 0.005 s: how "
                             "long a background thread may wait for the GIL while the engine's thread runs)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    args.hung_prompt_tokens = min(args.hung_prompt_tokens, args.prompt_tokens)

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
    stored_blocks = ((2 * args.reps + 4) * blocks_per_prompt + 3 * (args.hung_prompt_tokens // bs)
                     + (2 * args.decode_rounds + 4) * args.decode_prompts * decode_blocks)
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
              "engine_kv_cache": human_bytes(engine_blocks * block_bytes),
              "connector_sources": connector_sources(),
              **({"switch_interval": args.switch_interval} if args.switch_interval else {}),
              "engines": "none, kvA, kvB, exA, exB" + (", kvS (synchronous path)" if args.sync else ""),
              "hung": (f"short {args.hung_short_tokens} + fresh {args.hung_prompt_tokens} tokens"
                       + (", kvA and kvS" if args.sync and args.hung_sync else ", kvA")) if args.hung else "skipped"}
    log("params: " + ", ".join(f"{k}={v}" for k, v in params.items()))

    daemon = DaemonProcess(work, overrides, log_level="warning")
    engines: dict[str, Engine] = {}
    try:
        daemon.start()
        base = {"model": str(model), "block_size": bs, "max_model_len": max_len,
                "kv_cache_bytes": engine_blocks * block_bytes, "max_num_batched_tokens": max_len,
                "max_num_seqs": max(args.decode_prompts, 1)}
        if args.switch_interval:
            base["switch_interval"] = args.switch_interval
        specs = {"none": {}, "kvA": {"connector": "kvtier", "socket": daemon.socket},
                 "kvB": {"connector": "kvtier", "socket": daemon.socket},
                 "exA": {"connector": "example", "storage": example_dir},
                 "exB": {"connector": "example", "storage": example_dir}}
        if args.sync:
            specs["kvS"] = {"connector": "kvtier", "socket": daemon.socket, "extra_config": SYNC_CONFIG}
        for name, extra in specs.items():  # started together: their start-ups overlap
            engines[name] = Engine(name, {**base, **extra}, env, work)
        for name, engine in engines.items():
            info = engine.wait_ready()
            log(f"engine {name} ready in {info['startup_s']:.1f} s (pid {info['pid']})")
        loaded = {engine.info.get("sources") for engine in engines.values()} - {None}
        if loaded != {params["connector_sources"]}:  # edited while the engines started: say what they run
            params["connector_sources"] += " AT BENCH START; the engines loaded " + " / ".join(sorted(loaded))
            log("connector sources changed while the engines started: " + params["connector_sources"])
        result = measure(args, engines, daemon)
        rss = {name: e.memory() for name, e in engines.items()}
        daemon_cpu = daemon.cpu_seconds()
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            os.kill(daemon.pid, signal.SIGCONT)  # never leave it stopped (the hung-daemon part continues it too)
        for engine in engines.values():
            engine.close()
        daemon.stop()
        daemon.cleanup()
        shutil.rmtree(example_dir, ignore_errors=True)

    reps, decode, hung = result["reps"], result["decode"], result["hung"]
    sync = args.sync
    modes = ["recompute", "kvtier hit", "example hit", "kvtier store", "example store", "local hit",
             "kvtier local hit"] + (["kvtier sync hit", "kvtier sync store"] if sync else [])
    med = {mode: median([r[f"{mode} s"] for r in reps]) for mode in modes}
    hit_tokens = result["hit_tokens"]
    hits_ok = (all(r["kvtier hit cached"] == hit_tokens and r["example hit cached"] == hit_tokens
                   and r["local hit cached"] == hit_tokens and r["kvtier local hit cached"] == hit_tokens
                   and r["recompute cached"] == 0 and r["kvtier store cached"] == 0
                   and (not sync or (r["kvtier sync hit cached"] == hit_tokens and r["kvtier sync store cached"] == 0))
                   for r in reps))
    same_token = all(r["same 1st token"] for r in reps)
    drain = median([r["kvtier store: save drain s"] for r in reps])
    dec_none = median([r["none tok/s"] for r in decode])
    dec_kv = median([r["kvtier tok/s"] for r in decode])
    rows = [
        Row("TTFT, kvtier hit vs recompute", med["kvtier hit"], "s", med["recompute"], "recompute, no connector",
            ratio=med["recompute"] / med["kvtier hit"], goal=5, headline=True,
            notes=f"ratio = recompute / kvtier hit (x faster); {hit_tokens} of {args.prompt_tokens} tokens loaded "
                  "(asynchronous load, background lookup)"),
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
        Row("TTFT of a miss that stores, kvtier (asynchronous saves) vs recompute", med["kvtier store"], "s",
            med["recompute"], "recompute, no connector", ratio=med["recompute"] / med["kvtier store"], goal=0.98,
            headline=True,
            notes=f"ratio = recompute / (prefill + save); 1 = saving is free; the save is committed "
                  f"{1000 * drain:.0f} ms (median) after the first token, in the background"),
    ]
    if sync:
        hit_a, hit_s = med["kvtier hit"], med["kvtier sync hit"]
        better = "asynchronous" if hit_a < hit_s else "synchronous"
        rows += [
            Row("TTFT of a miss that stores, kvtier synchronous path vs recompute", med["kvtier sync store"], "s",
                med["recompute"], "recompute, no connector", ratio=med["recompute"] / med["kvtier sync store"],
                notes="kvS: the save is copied and committed inside the step, before the first token"),
            Row("TTFT of a miss that stores, kvtier asynchronous vs synchronous", med["kvtier store"], "s",
                med["kvtier sync store"], "kvtier synchronous path (kvS)",
                ratio=med["kvtier sync store"] / med["kvtier store"],
                notes="ratio = synchronous / asynchronous; > 1: the asynchronous path serves the first token sooner"),
            Row("TTFT, kvtier hit: asynchronous vs synchronous loads", hit_a, "s", hit_s,
                "synchronous load + lookup (kvS)", ratio=hit_s / hit_a, headline=True,
                notes=f"ratio = synchronous / asynchronous; > 1: asynchronous is faster. {better.capitalize()} "
                      f"loads serve TTFT better here ({hit_a:.3f} s async vs {hit_s:.3f} s sync)"),
            Row("TTFT, kvtier synchronous hit vs recompute", hit_s, "s", med["recompute"], "recompute, no connector",
                ratio=med["recompute"] / hit_s, notes="informative"),
        ]
    rows += [
        Row("decode while saving, kvtier (asynchronous) vs none", dec_kv, "tok/s", dec_none, "no connector",
            ratio=median([r["kvtier / none"] for r in decode]), goal=0.95, headline=True,
            notes=f"{args.decode_prompts} never-hit prompts x {args.decode_tokens} tokens, every full block saved; "
                  "ratio = median of the per-round ratios (interleaved)"),
        Row("decode CPU time, kvtier (asynchronous) vs none", median([r["kvtier CPU ms/tok"] for r in decode]),
            "CPU ms/tok", median([r["none CPU ms/tok"] for r in decode]), "no connector",
            ratio=median([r["kvtier / none, CPU"] for r in decode]), goal=0.95,
            notes="engine process CPU (+ kvtierd's CPU in the same interval, + the save drain after the generate) "
                  "per output token; ratio = none / kvtier; less sensitive to other load than wall time"),
    ]
    if sync:
        rows += [
            Row("decode while saving, kvtier synchronous path vs none",
                median([r["kvtier sync tok/s"] for r in decode]),
                "tok/s", dec_none, "no connector", ratio=median([r["kvtier sync / none"] for r in decode]),
                notes="kvS; ratio = median of the per-round ratios"),
            Row("decode while saving, kvtier asynchronous vs synchronous", dec_kv, "tok/s",
                median([r["kvtier sync tok/s"] for r in decode]), "kvtier synchronous path (kvS)",
                ratio=median([r["kvtier / kvtier sync"] for r in decode]), headline=True,
                notes="ratio = median of the per-round async / sync ratios; > 1: asynchronous is faster"),
            Row("decode CPU time, kvtier synchronous path vs none",
                median([r["kvtier sync CPU ms/tok"] for r in decode]),
                "CPU ms/tok", median([r["none CPU ms/tok"] for r in decode]), "no connector",
                ratio=median([r["kvtier sync / none, CPU"] for r in decode]), notes="ratio = none / kvS"),
        ]
    if args.decode_example:
        rows.append(Row("decode, ExampleConnector vs none", median([r["example tok/s"] for r in decode]), "tok/s",
                        dec_none, "no connector", ratio=median([r["example / none"] for r in decode]),
                        notes="informative: the cost of having any connector"))
    hung_notes = []
    if hung:
        recs = {rec["prompt"]: rec for rec in hung["records"]}
        deadline_s = hung["deadline_s"]
        first, later = recs["fresh 1"], [recs[k] for k in ("fresh 2", "short 1", "short 2")]
        extra = first["kvtier extra s"]
        within = extra <= 1.2 * deadline_s
        later_kv, later_none = sum(r["kvtier s"] for r in later), sum(r["none s"] for r in later)
        rows += [
            Row("hung daemon: first fresh prompt, kvtier vs none", first["kvtier s"], "s", first["none s"],
                "the same prompt, no connector", ratio=first["none s"] / first["kvtier s"],
                notes=f"kvtierd SIGSTOPped; {extra:+.2f} s over none; expected at most about one scheduler deadline "
                      f"({deadline_s:g} s): {'yes' if within else 'NO'}"),
            Row("hung daemon: the other prompts, kvtier vs none", later_kv, "s", later_none,
                "the same prompts, no connector", ratio=later_none / later_kv,
                notes=f"sum of a second fresh prompt ({recs['fresh 2']['kvtier extra s']:+.3f} s) and two short ones "
                      f"({recs['short 1']['kvtier extra s']:+.3f} s before the first fresh one, "
                      f"{recs['short 2']['kvtier extra s']:+.3f} s after); 1 = they cost nothing"),
        ]
        if "kvtier sync" in hung["subjects"]:
            rows.append(Row("hung daemon: first fresh prompt, kvtier synchronous path vs none", first["kvtier sync s"],
                            "s", first["none s"], "the same prompt, no connector",
                            ratio=first["none s"] / first["kvtier sync s"],
                            notes=f"informative: kvS, {first['kvtier sync extra s']:+.2f} s over none (its lookup "
                                  f"and its save wait in the step); the others "
                                  f"{sum(r['kvtier sync s'] for r in later) - later_none:+.3f} s in all"))
        after = hung["after"]
        rows.append(Row("after SIGCONT: kvtier hit vs recompute", after["kvB hit s"], "s", after["none recompute s"],
                        "recompute, no connector", ratio=after["none recompute s"] / after["kvB hit s"],
                        notes=f"a fresh {args.hung_prompt_tokens}-token prompt stored by kvA, loaded by kvB "
                              f"({after['kvB hit cached']} of {after['expected cached']} expected tokens cached)"
                              + (f" and kvS ({after['kvS sync hit cached']})" if "kvS sync hit cached" in after else "")
                              + f"; engines working after the hang: {'yes' if after['recovered'] else 'NO'}; "
                              + (f"breakers closed {hung['closed_s']:.1f} s after SIGCONT"
                                 if hung["closed_s"] is not None else "breakers NOT closed within the wait")))
        hung_notes.append(f"Hung daemon: kvtierd was SIGSTOPped for {hung['stopped_s']:.1f} s (then SIGCONTed); "
                          f"scheduler deadline {deadline_s:g} s, breaker period {hung['period_s']:g} s. Breakers "
                          + (f"closed {hung['closed_s']:.1f} s after SIGCONT." if hung["closed_s"] is not None
                             else "had NOT all closed 30 s after SIGCONT."))
    breakdown = []
    for mode in ("kvtier hit", "kvtier sync hit", "kvtier store", "kvtier sync store", "kvtier local hit"):
        if f"{mode} s" not in reps[0]:
            continue
        record = {"run": mode, "TTFT s": med[mode]}
        for part in ("steps", "lookup s", "load job s", "save job s", "save drain s", "connector s"):
            values = [r.get(f"{mode}: {part}") for r in reps]
            if any(v is not None for v in values):
                record[part] = median([v or 0 for v in values])
        breakdown.append(record)
    details = {"TTFT per repetition (seconds; cached = num_cached_tokens; block counters: the kvtier worker's, "
               "over the run and its settle; steps = engine steps of the run; lookup "
               "/ load job / save job = wall time of the connector's lookups, load and save jobs, on their "
               "background threads or inline)": reps,
               "where a kvtier run's time goes (medians over the repetitions; connector s = the entry points "
               "on the engine's thread)": breakdown,
               "decode rounds (output tokens/s of the whole generate; CPU ms per output token; drain = the "
               "background saves left after the generate)": decode}
    if hung:
        details["hung daemon (kvtierd SIGSTOPped): latency per prompt, in order (seconds)"] = hung["records"]
        details["hung daemon: connector counters over the hang and the recovery (scheduler and worker sessions)"] = \
            hung["breakers"]
        details["after SIGCONT: a fresh prompt stored by kvA, loaded by kvB (and kvS)"] = [hung["after"]]
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
        f"Hits: every kvtier/ExampleConnector hit loaded {hit_tokens} tokens and every recompute and store 0: "
        f"{'yes' if hits_ok else 'NO (see the table)'}; the first token of every run of P was the same: "
        f"{'yes' if same_token else 'NO'}. kvB, exB and kvS never ran the prompt before (fresh engine, nothing "
        "local); one engine process per role, all alive, one working at a time.",
        "TTFT = llm.generate([prompt], max_tokens=1) timed inside the engine process (in-process engine core), "
        "after a warm-up of the same shapes. Medians over the repetitions.",
    ]
    if sync:
        notes.append(f"Asynchronous vs synchronous hit: {better} loads serve TTFT better in this run "
                     f"(median {hit_a:.3f} s async vs {hit_s:.3f} s sync). kvA/kvB: background lookups, async loads "
                     f"and saves (the defaults); kvS: kv_connector_extra_config {json.dumps(SYNC_CONFIG)}.")
    dups = {mode: sum(r.get(f"{mode}: duplicate blocks", 0) for r in reps)
            for mode in ("kvtier hit", "kvtier sync hit", "kvtier local hit") if f"{mode} s" in reps[0]}
    if any(dups.values()):
        notes.append("Duplicate saves: over the %d repetitions the kvtier hits saved again blocks kvtierd already "
                     "held (DUPLICATE): %s." % (len(reps), ", ".join(f"{mode} {count}"
                                                                      for mode, count in dups.items())))
    notes += hung_notes + [
        f"kvtierd: CPU tier only (disk off), {daemon_cpu:.1f} CPU s used in all. ExampleConnector: safetensors per "
        f"layer and prompt in {args.example_dir} (tmpfs).",
        "Engines: VLLM_CPU_OMP_THREADS_BIND=nobind, OMP_NUM_THREADS=%d; vLLM's default auto-binding gives a "
        "connector engine a different number of OMP threads than a plain one on small machines." % args.threads,
        "Engine RSS at the end: " + ", ".join(f"{k} {v}" for k, v in rss.items()) + ".",
        f"Total wall time {time.monotonic() - started:.0f} s; profiles (cProfile dumps) in {work / 'profiles'}.",
    ]
    log(notes[0])
    if sync:
        log(notes[2])
    return write_results(NAME, TITLE, rows, params, args.out, details=details, notes=notes, plot=not args.no_plot)


if __name__ == "__main__":
    main()
