"""Runs one vLLM engine (CPU) in this process on a list of prompts, in sequence; writes JSON results.

python _vllm_engine.py SPEC.json OUT.json

SPEC: {"model": dir, "socket": kvtierd socket or null (no connector), "hash_algo": "sha256",
       "max_tokens": 8, "max_num_batched_tokens": 1024 (smaller: chunked prefill),
       "kv_cache_memory_bytes": 64 MiB (smaller: requests are preempted), "batch": false (true: every
       prompt in one generate call, running concurrently; per-prompt options are ignored),
       "extra_config": optional, merged into kv_connector_extra_config,
       "prompts": [{"tokens": [...], "salt": optional str, "max_tokens": optional,
                    "kv_transfer_params": optional (SamplingParams.extra_args, as the OpenAI server passes it),
                    "sigstop": optional pid, SIGSTOPped (a hung kvtierd) before this prompt runs,
                    "wait_for": optional path: before this prompt, write PATH.waiting and wait until PATH
                                exists (the test restarts the daemon meanwhile),
                    "reset_prefix_cache": optional, empty vLLM's own prefix cache before this prompt,
                    "sigcont": optional pid, SIGCONTed before this prompt (after "sigstop"),
                    "wait_breaker_closed": optional, before this prompt wait until both connectors'
                                           circuit breakers closed again}]}
OUT:  {"results": [{"tokens": [...], "num_cached_tokens": n, "keys": [hex, ...] of every full block of
       prompt + output, "seconds": the prompt's wall time}, ...], "stats": connector worker stats,
       "scheduler_stats": the scheduler connector's stats (in-process engine core), "startup_s", "run_s"}
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: conftest

from conftest import sigstop  # noqa: E402 - after the path it lives on


def block_keys(spec: dict, tokens: list[int], block_size: int = 32) -> list[str]:
    """vLLM's block hashes of an unsalted text prompt (the kvtier keys), hex; the engine runs in this
    process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so NONE_HASH is the engine's."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import hash_block_tokens
    hash_fn = get_hash_fn_by_name(spec.get("hash_algo", "sha256"))
    keys, parent = [], None
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash_block_tokens(hash_fn, parent, tokens[start:start + block_size], None)
        keys.append(bytes(parent).hex())
    return keys


def _wait_for_file(path: str, timeout_s: float = 300.0) -> None:
    with open(path + ".waiting", "w"):
        pass
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s} s"
        time.sleep(0.05)


def _wait_breakers_closed(llm, timeout_s: float = 60.0) -> None:
    """Until the scheduler's and the worker's connectors closed their circuit breakers (their health
    probes found the daemon serving again)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group
    connectors = [llm.llm_engine.engine_core.engine_core.scheduler.get_kv_connector(), get_kv_transfer_group()]
    deadline = time.monotonic() + timeout_s
    while any(c.stats["breaker_open"] for c in connectors):
        assert time.monotonic() < deadline, f"circuit breakers still open after {timeout_s} s"
        time.sleep(0.05)


def _batch(spec: dict, llm) -> list[dict]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 8), ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p["tokens"]) for p in spec["prompts"]], params,
                           use_tqdm=False)
    if _settle_saves() is not None:
        _drain(llm)
    return [{"tokens": list(o.outputs[0].token_ids), "num_cached_tokens": o.num_cached_tokens or 0,
             "keys": block_keys(spec, p["tokens"] + list(o.outputs[0].token_ids)), "seconds": None,
             "saves_settled": True} for p, o in zip(spec["prompts"], outputs)]


def _settle_saves() -> bool | None:
    """Waits until the worker connector's background saves of the prompts so far are committed, so that
    the next prompt's lookup sees them (the readiness signal: its transfer engine is idle). None
    without a connector."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group
    if not has_kv_transfer_group():
        return None
    transfers = getattr(get_kv_transfer_group(), "_transfers", None)
    return transfers.wait_idle(60.0) if transfers is not None else None


def _drain(llm) -> None:
    """Steps the in-process engine until no finished request waits for the connector: a request whose
    blocks are being saved is reported done at a later step, and an offline engine only steps inside
    generate (a server's engine loop keeps stepping by itself)."""
    core = llm.llm_engine.engine_core.engine_core
    deadline = time.monotonic() + 60.0
    while core.scheduler.has_finished_requests():
        assert time.monotonic() < deadline, "finished requests still held by the connector after 60 s"
        core.step()


def main(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kv_transfer_config = None
    if spec.get("socket"):
        kv_transfer_config = KVTransferConfig(
            kv_connector="KvtierConnector", kv_connector_module_path="kvtier.connectors.vllm",
            kv_role="kv_both", kv_load_failure_policy="recompute",
            kv_connector_extra_config={"socket": spec["socket"], **spec.get("extra_config", {})})
    started = time.monotonic()
    llm = LLM(model=spec["model"], tokenizer=spec["model"], dtype="float32", block_size=32, max_model_len=1024,
              kv_cache_memory_bytes=spec.get("kv_cache_memory_bytes", 64 << 20), enforce_eager=True, enable_prefix_caching=True,
              prefix_caching_hash_algo=spec.get("hash_algo", "sha256"), seed=0, max_num_seqs=8,
              max_num_batched_tokens=spec.get("max_num_batched_tokens", 1024), kv_transfer_config=kv_transfer_config)
    ready = time.monotonic()
    if spec.get("batch"):  # every prompt in one generate: they run concurrently
        results = _batch(spec, llm)
        spec["prompts"] = []
    else:
        results = []
    for prompt in spec["prompts"]:
        if prompt.get("sigstop"):
            sigstop(prompt["sigstop"])
        if prompt.get("sigcont"):
            os.kill(prompt["sigcont"], signal.SIGCONT)
        if prompt.get("wait_breaker_closed"):
            _wait_breakers_closed(llm)
        if prompt.get("wait_for"):
            _wait_for_file(prompt["wait_for"])
        if prompt.get("reset_prefix_cache"):
            assert llm.reset_prefix_cache(), "vLLM did not reset its prefix cache"
        prompt_started = time.monotonic()
        extra_args = ({"kv_transfer_params": prompt["kv_transfer_params"]} if "kv_transfer_params" in prompt
                      else None)
        params = SamplingParams(temperature=0.0, max_tokens=prompt.get("max_tokens", spec.get("max_tokens", 8)),
                                ignore_eos=True, extra_args=extra_args)
        request = TokensPrompt(prompt_token_ids=prompt["tokens"])
        if prompt.get("salt"):
            request["cache_salt"] = prompt["salt"]
        (output,) = llm.generate([request], params, use_tqdm=False)
        tokens = list(output.outputs[0].token_ids)
        seconds = time.monotonic() - prompt_started
        settled = _settle_saves()
        if settled is not None:
            _drain(llm)
        results.append({"tokens": tokens, "num_cached_tokens": output.num_cached_tokens or 0,
                        "keys": None if prompt.get("salt") or not spec.get("keys", True)
                        else block_keys(spec, prompt["tokens"] + tokens), "seconds": seconds,
                        "saves_settled": settled})
    stats = scheduler_stats = None
    try:
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group
        if has_kv_transfer_group():
            stats = dict(get_kv_transfer_group().stats)
    except Exception:  # noqa: BLE001 - stats are informational
        pass
    try:  # the in-process engine core's scheduler and its connector
        connector = llm.llm_engine.engine_core.engine_core.scheduler.get_kv_connector()
        scheduler_stats = dict(connector.stats) if connector is not None else None
    except Exception:  # noqa: BLE001 - stats are informational
        pass
    with open(out_path, "w") as out:
        json.dump({"results": results, "stats": stats, "scheduler_stats": scheduler_stats, "startup_s": ready - started,
                   "run_s": time.monotonic() - ready}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
