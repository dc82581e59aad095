"""One vLLM CPU engine kept alive in this process, driven by line-delimited JSON commands (for
bench_vllm_ttft.py). The engine core runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so every
timing below is taken in the same process as the forward passes.

python _vllm_ttft_engine.py SPEC_JSON        (the spec itself, not a path)
python _vllm_ttft_engine.py --build-model OUT_DIR HIDDEN LAYERS HEADS KV_HEADS HEAD_DIM INTERMEDIATE

SPEC: {"model": dir, "connector": null | "kvtier" | "example", "socket": kvtierd socket,
       "extra_config": {...} merged into the kvtier connector's kv_connector_extra_config (e.g.
                       {"background_lookups": false, "async_loads": false, "async_saves": false}),
       "storage": ExampleConnector dir, "block_size": 32, "max_model_len": n, "kv_cache_bytes": n,
       "max_num_batched_tokens": n, "max_num_seqs": n,
       "switch_interval": optional, sys.setswitchinterval(s) before the engine starts (a diagnostic: how
                          long a thread waits for the GIL while another one runs Python; default 0.005)}

Protocol: the original stdout carries only the replies (one JSON line each); everything the libraries
print goes to stderr. Commands (stdin, one JSON line each):
  {"cmd": "generate", "prompts": [[token ids], ...], "max_tokens": n}
      -> {"seconds": wall time of llm.generate, "cpu_s": CPU time of this process (all threads),
          "outputs": [{"tokens", "num_cached_tokens"}], "stats": the connector's worker counters,
          "scheduler_stats": the scheduler connector's counters (in-process engine core),
          "connector": {entry point: [calls, wall seconds]} of the connector during this command,
          "threads": {"_lookup" | "_load" | "_save": [calls, wall seconds]}: the kvtier connector's lookups,
                     load jobs and save jobs that ended during this command (or, for "settle", since the
                     last reply), on whichever thread they ran}
  {"cmd": "profile", ... same as generate ..., "path": file}: the same under cProfile; the stats are
      dumped to path, the reply adds "profile": the connector's functions and the hottest functions.
  {"cmd": "settle", "timeout": s}: waits until the worker connector's background saves and loads ended
      (``_transfers.wait_idle``) -> {"idle": bool (None: no kvtier connector), "seconds", "cpu_s",
      "stats", "scheduler_stats", "threads"}; no engine step runs meanwhile.
  {"cmd": "state"} -> {"stats", "scheduler_stats", "config": the scheduler connector's deadlines}
  {"cmd": "quit"}
The first reply, {"ready": true, "startup_s", "pid", "sources": digests of the kvtier connector files
it imported (None without it)}, comes once the engine is up.
"""

from __future__ import annotations

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests", "connectors")


def build_model(out_dir: str, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                intermediate: int) -> None:
    """The tests' tiny model generator (tokenizer and all), then a wider/deeper random Llama over it."""
    sys.path.insert(0, TESTS)
    import _tiny_model
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _tiny_model.build(out_dir, 0)  # tokenizer (vocab 2048) + a tiny model that is replaced below
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                         torch_dtype="float32", tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(out_dir, safe_serialization=True)


def _connector_config(spec: dict):
    from vllm.config import KVTransferConfig
    if spec.get("connector") == "kvtier":
        return KVTransferConfig(kv_connector="KvtierConnector", kv_connector_module_path="kvtier.connectors.vllm",
                                kv_role="kv_both", kv_load_failure_policy="recompute",
                                kv_connector_extra_config={"socket": spec["socket"],
                                                           **(spec.get("extra_config") or {})})
    if spec.get("connector") == "example":
        return KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both",
                                kv_connector_extra_config={"shared_storage_path": spec["storage"]})
    return None


def _stats():
    try:
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group
        if has_kv_transfer_group():
            return dict(getattr(get_kv_transfer_group(), "stats", None) or {}) or None
    except Exception:  # noqa: BLE001 - informational
        pass
    return None


def _worker_connector():
    try:
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group
        return get_kv_transfer_group() if has_kv_transfer_group() else None
    except Exception:  # noqa: BLE001 - informational
        return None


def _scheduler_connector(llm):
    try:  # the in-process engine core's scheduler
        return llm.llm_engine.engine_core.engine_core.scheduler.get_kv_connector()
    except Exception:  # noqa: BLE001 - informational
        return None


def _scheduler_stats(llm):
    connector = _scheduler_connector(llm)
    return dict(getattr(connector, "stats", None) or {}) or None


def _sources() -> str | None:
    """Digests of the kvtier connector files this process imported (hashed right after the engine started:
    the files are edited while benches run), in bench_vllm_ttft.connector_sources' format."""
    import hashlib
    mods = [sys.modules.get(f"kvtier.connectors.{name}") for name in ("vllm", "_transfers", "_pipeline", "_daemon",
                                                                     "_layout")]
    if mods[0] is None:
        return None
    out = []
    for mod in mods:
        if mod is not None and getattr(mod, "__file__", None):
            with open(mod.__file__, "rb") as file:
                out.append(f"{os.path.basename(mod.__file__)}:{hashlib.sha256(file.read()).hexdigest()[:8]}")
    return " ".join(out)


def _settle(timeout: float) -> bool | None:
    """Waits until the kvtier worker connector has no background save or load left (None: none)."""
    transfers = getattr(_worker_connector(), "_transfers", None)
    return None if transfers is None else transfers.wait_idle(timeout)


# The connector API that vLLM calls (scheduler and worker side); they never call each other.
ENTRY_POINTS = {"get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta", "request_finished",
                "update_connector_output", "start_load_kv", "wait_for_layer_load", "save_kv_layer", "wait_for_save",
                "get_finished", "get_block_ids_with_load_errors", "bind_connector_metadata",
                "clear_connector_metadata", "handle_preemptions", "get_kv_connector_stats"}


CONNECTOR_CLASSES = (("kvtier.connectors.vllm", "KvtierConnector"),
                     ("vllm.distributed.kv_transfer.kv_connector.v1.example_connector", "ExampleConnector"))
TIMES: dict[str, list] = {}  # entry point -> [calls, seconds], cumulative
# The kvtier connector's own functions that run on its background threads (or inline on the synchronous
# path): the wall time of a lookup, a load job, a save job, wherever it ran. Cumulative, under a lock.
THREAD_FUNCS = ("_lookup", "_load", "_save")
THREAD_TIMES: dict[str, list] = {}
THREAD_MARK: dict[str, list] = {}  # THREAD_TIMES as last reported: every job is reported once


def _thread_delta() -> dict[str, list]:
    """The lookups, load and save jobs that ended since the last reply that reported them."""
    now = {name: list(value) for name, value in list(THREAD_TIMES.items())}
    delta = {name: [calls - THREAD_MARK.get(name, [0, 0.0])[0], secs - THREAD_MARK.get(name, [0, 0.0])[1]]
             for name, (calls, secs) in now.items()}
    THREAD_MARK.clear()
    THREAD_MARK.update(now)
    return {name: value for name, value in delta.items() if value[0]}


def _instrument() -> None:
    """Wall time of every connector entry point: wraps the methods each connector class defines itself
    (inherited ones are left alone, so what vLLM sees as overridden does not change)."""
    import functools
    import importlib

    import threading
    lock = threading.Lock()

    def timed(name, fn, table=TIMES):
        """fn counting its calls and wall time into table[name] (under a lock: the connector's own
        functions also run on its background threads)."""
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with lock:
                    entry = table.setdefault(name, [0, 0.0])
                    entry[0] += 1
                    entry[1] += time.perf_counter() - start
        return wrapper

    def timed_thread(name, fn):
        return timed(name, fn, THREAD_TIMES)

    for module, name in CONNECTOR_CLASSES:
        try:
            klass = getattr(importlib.import_module(module), name)
        except Exception:  # noqa: BLE001 - a connector that does not import is not used either
            continue
        for method in ENTRY_POINTS & set(vars(klass)):
            setattr(klass, method, timed(method, vars(klass)[method]))
        if name == "KvtierConnector":
            for method in set(THREAD_FUNCS) & set(vars(klass)):
                setattr(klass, method, timed_thread(method, vars(klass)[method]))


def _connector_dirs() -> tuple[str, ...]:
    """Source dirs whose functions count as the connector's: kvtier's connector + client, ExampleConnector."""
    dirs = []
    for module in ("kvtier.connectors.vllm", "kvtier.client.client",
                   "vllm.distributed.kv_transfer.kv_connector.v1.example_connector"):
        try:
            mod = __import__(module, fromlist=["_"])
        except Exception:  # noqa: BLE001
            continue
        dirs.append(mod.__file__ if "example" in module else os.path.dirname(mod.__file__) + os.sep)
    return tuple(dirs)


def _profile_summary(profiler, path: str, top: int = 25) -> dict:
    import pstats
    profiler.dump_stats(path)
    stats = pstats.Stats(profiler)
    total = max(stats.total_tt, 1e-9)  # noqa: SLF001
    rows = []
    for (filename, line, name), (cc, nc, tt, ct, _callers) in stats.stats.items():  # noqa: SLF001
        rows.append({"function": f"{os.path.basename(filename)}:{line}({name})", "file": filename,
                     "calls": nc, "tottime_s": tt, "cumtime_s": ct})
    ours = _connector_dirs()
    entry = [r for r in rows if r["function"].split("(")[-1].rstrip(")") in ENTRY_POINTS
             and (r["file"].startswith(ours) or r["file"].endswith("kv_connector/v1/base.py"))]
    connector = sorted((r for r in rows if r["file"].startswith(ours)), key=lambda r: -r["cumtime_s"])[:top]
    hottest = sorted(rows, key=lambda r: -r["tottime_s"])[:top]
    for r in connector + hottest:
        r.pop("file", None)
    return {"total_s": total, "connector": connector, "hottest": hottest,
            "connector_s": sum(r["cumtime_s"] for r in entry), "connector_calls": sum(r["calls"] for r in entry)}


def serve(spec: dict) -> None:
    reply_fd = os.dup(1)          # the protocol channel
    os.dup2(2, 1)                 # anything printed by vLLM & co. goes to stderr
    sys.stdout = sys.stderr
    replies = os.fdopen(reply_fd, "w", buffering=1)

    def reply(obj) -> None:
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if spec.get("switch_interval"):
        sys.setswitchinterval(float(spec["switch_interval"]))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if spec.get("connector"):
        _instrument()
    started = time.monotonic()
    llm = LLM(model=spec["model"], tokenizer=spec["model"], dtype="float32", block_size=spec["block_size"],
              max_model_len=spec["max_model_len"], kv_cache_memory_bytes=spec["kv_cache_bytes"],
              enforce_eager=True, enable_prefix_caching=True, prefix_caching_hash_algo="sha256", seed=0,
              max_num_seqs=spec["max_num_seqs"], max_num_batched_tokens=spec["max_num_batched_tokens"],
              kv_transfer_config=_connector_config(spec))
    reply({"ready": True, "startup_s": time.monotonic() - started, "pid": os.getpid(), "sources": _sources()})

    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "quit":
            break
        if command["cmd"] == "settle":
            start, cpu_start = time.perf_counter(), time.process_time()
            idle = _settle(float(command.get("timeout", 60.0)))
            reply({"idle": idle, "seconds": time.perf_counter() - start, "cpu_s": time.process_time() - cpu_start,
                   "stats": _stats(), "scheduler_stats": _scheduler_stats(llm), "threads": _thread_delta()})
            continue
        if command["cmd"] == "state":
            connector = _scheduler_connector(llm)
            config = {name: getattr(connector, "_" + name, None)
                      for name in ("scheduler_timeout_s", "timeout_s", "breaker_period_s", "background_lookups",
                                   "async_loads", "async_saves")} if connector is not None else None
            reply({"stats": _stats(), "scheduler_stats": _scheduler_stats(llm), "config": config})
            continue
        params = SamplingParams(temperature=0.0, max_tokens=command.get("max_tokens", 1), ignore_eos=True)
        prompts = [TokensPrompt(prompt_token_ids=tokens) for tokens in command["prompts"]]
        profiler = None
        if command["cmd"] == "profile":
            import cProfile
            profiler = cProfile.Profile()
            profiler.enable()
        before = {name: list(value) for name, value in TIMES.items()}
        _thread_delta()  # what ended before this command is not this command's
        start, cpu_start = time.perf_counter(), time.process_time()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        if profiler is not None:
            profiler.disable()
        timing = {name: [calls - before.get(name, [0, 0.0])[0], secs - before.get(name, [0, 0.0])[1]]
                  for name, (calls, secs) in TIMES.items()}
        # Ended during the generate; a save job still running when it returned goes to the next "settle".
        threads = _thread_delta()
        out = {"seconds": seconds, "cpu_s": cpu_s, "stats": _stats(), "scheduler_stats": _scheduler_stats(llm),
               "connector": {name: value for name, value in timing.items() if value[0]},
               "threads": threads,
               "outputs": [{"tokens": list(o.outputs[0].token_ids), "num_cached_tokens": o.num_cached_tokens or 0}
                           for o in outputs]}
        if profiler is not None:
            out["profile"] = _profile_summary(profiler, command["path"])
        reply(out)
    replies.close()


if __name__ == "__main__":
    if sys.argv[1] == "--build-model":
        build_model(sys.argv[2], *map(int, sys.argv[3:9]))
    else:
        serve(json.loads(sys.argv[1]))
