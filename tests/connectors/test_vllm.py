"""The vLLM connector against a real vLLM engine on CPU and a real kvtierd.

Every engine runs in its own process (`_vllm_engine.py`, in-process engine core, PYTHONHASHSEED=0) on a
tiny random Llama generated here (no download). Greedy tokens are compared with a reference engine that
runs without the connector; `num_cached_tokens` and the connector's counters show what was loaded.
Prompts are 100 tokens: 3 full blocks of 32 plus 4 tokens.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from conftest import tenant_env, wait_for
from s3server import free_port
from certs import Authority, peer_overrides
from kvtier.client import block_checksum
from kvtier.proto.v1 import kvtier_pb2 as pb

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCK = 32
DAEMON = {"cpu.capacity": "64MiB", "cpu.slot_bytes": "64KiB", "disk.capacity": "256MiB"}

# No skip when vLLM is missing: `make test` installs it (requirements/engines.txt), and a suite
# that silently skips the engine tests would pass without proving anything.
assert importlib.util.find_spec("vllm") is not None, "vLLM is not installed: run `make test`"



def _tokens(seed: int, n: int = 100) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 2000) for _ in range(n)]


A = _tokens(1)
B = A[:2 * BLOCK] + _tokens(2, 36)  # shares A's first two blocks only
S = _tokens(3)
C, E, F, G = _tokens(4), _tokens(5), _tokens(6), _tokens(7)
T, L = _tokens(8, 40), _tokens(9, 900)  # the short and long requests (1 and 28 full blocks)
ALL = {"A": A, "B": B, "S": S, "C": C, "E": E, "F": F, "G": G, "T": T, "L": L}


def _engine_env(hash_seed: str | None = "0") -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONHASHSEED", None)
    if hash_seed is not None:
        env["PYTHONHASHSEED"] = hash_seed
    return env


def _prompt(item) -> dict:
    """A prompt of the engine spec from a name, (name, salt) or {"name": ..., any other prompt field}."""
    if isinstance(item, str):
        return {"tokens": ALL[item]}
    if isinstance(item, tuple):
        return {"tokens": ALL[item[0]], "salt": item[1]}
    return {"tokens": ALL[item["name"]], **{k: v for k, v in item.items() if k != "name"}}


def run_engine(tmp_path, model: str, prompts: list, socket: str | None, name: str, hash_algo: str = "sha256",
               hash_seed: str | None = "0", check: bool = True, chunk: int = 1024, extra_config: dict | None = None,
               uid: int | None = None):
    """Runs prompts (name, (name, salt) or a dict, see _prompt) in sequence in a fresh engine process; returns
    (results, stats, log). chunk < 100: prefills are split into steps of `chunk` tokens (chunked prefill).
    `uid`: the engine runs as that user (setpriv), as a tenant's engine would; tmp_path and the model
    must be readable by it (and tmp_path writable)."""
    spec = {"model": model, "socket": socket, "hash_algo": hash_algo, "max_tokens": 8,
            "max_num_batched_tokens": chunk, "prompts": [_prompt(p) for p in prompts],
            "extra_config": extra_config or {}}
    spec_path, out_path = tmp_path / f"{name}.spec.json", tmp_path / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    command = [sys.executable, os.path.join(HERE, "_vllm_engine.py"), str(spec_path), str(out_path)]
    env = _engine_env(hash_seed)
    if uid is not None:
        command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *command]
        env = tenant_env(env, str(tmp_path))
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    (tmp_path / f"{name}.log").write_text(log)
    if not check:
        return proc.returncode, log
    assert proc.returncode == 0, f"engine {name} failed:\n{log[-6000:]}"
    out = json.loads(out_path.read_text())
    return out["results"], out["stats"], log


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Two tiny random Llamas (seeds 0 and 1) with the same tokenizer."""
    root = tmp_path_factory.mktemp("models")
    paths = [str(root / "llama-seed0"), str(root / "llama-seed1")]
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import _tiny_model as m; "
            "m.build(sys.argv[2], 0); m.build(sys.argv[3], 1)")
    subprocess.run([sys.executable, "-c", code, HERE, *paths], check=True, env=_engine_env(), capture_output=True,
                   timeout=300)
    return paths


@pytest.fixture(scope="session")
def reference(models, tmp_path_factory):
    """Greedy tokens of every prompt from an engine without the connector."""
    results, stats, _ = run_engine(tmp_path_factory.mktemp("ref"), models[0], list(ALL), None, "reference")
    assert stats is None
    return {name: r["tokens"] for name, r in zip(ALL, results)}


def _namespaces(daemon):
    with daemon.client() as c:
        return {n.name: dict(n.attributes) for n in c.list_namespaces()}


def test_a_second_engine_loads_what_the_first_stored(make_daemon, models, reference, tmp_path):
    daemon = make_daemon(DAEMON)
    # Chunked prefill: the blocks of one prompt are computed, and stored, over two steps.
    first, stats1, _ = run_engine(tmp_path, models[0], ["A", ("S", "tenant-1")], daemon.socket, "e1", chunk=64)
    assert [r["num_cached_tokens"] for r in first] == [0, 0]
    assert [r["tokens"] for r in first] == [reference["A"], reference["S"]]
    assert stats1["saved_blocks"] == 6 and stats1["loaded_blocks"] == 0
    (namespace, attributes), = _namespaces(daemon).items()
    assert namespace.startswith("vllm.") and attributes["model"] == models[0]
    assert attributes["hash_algo"] == "sha256" and attributes["kv_dtype"] == "float32"
    assert attributes["block_size"] == "32" and attributes["tp_rank"] == "0" and attributes["platform"] == "cpu"

    # A fresh process: its own prefix cache is empty, so every hit comes from kvtier.
    second, stats2, _ = run_engine(tmp_path, models[0], ["B", "A", ("S", "tenant-2"), ("S", "tenant-1"), "A"],
                                   daemon.socket, "e2")
    b, a, s_other_salt, s_same_salt, a_again = second
    assert b["num_cached_tokens"] == 2 * BLOCK      # only the two blocks B shares with A
    assert a["num_cached_tokens"] == 3 * BLOCK      # 2 now local (from B's load) + 1 from kvtier
    assert s_other_salt["num_cached_tokens"] == 0   # cache_salt is in the block hashes: no hit
    assert s_same_salt["num_cached_tokens"] == 3 * BLOCK
    assert a_again["num_cached_tokens"] == 3 * BLOCK  # all from vLLM's own prefix cache
    assert [r["tokens"] for r in second] == [reference["B"], reference["A"], reference["S"], reference["S"],
                                             reference["A"]]
    assert stats2["loaded_blocks"] == 2 + 1 + 3 and stats2["load_errors"] == 0
    assert stats2["saved_blocks"] == 1 + 3          # B's own third block, S under the other salt
    assert stats2["duplicate_blocks"] == 0          # a local hit re-saves nothing already stored

    # Another model (same architecture and tokenizer, other weights): another namespace, no hits.
    third, stats3, _ = run_engine(tmp_path, models[1], ["A"], daemon.socket, "e3")
    assert third[0]["num_cached_tokens"] == 0 and stats3["loaded_blocks"] == 0 and stats3["saved_blocks"] == 3
    namespaces = _namespaces(daemon)
    assert len(namespaces) == 2
    assert sorted(n["model"] for n in namespaces.values()) == sorted(models)
    with daemon.client() as c:
        assert {ns: len(list(c.iter_inventory(ns))) for ns in namespaces} == {namespace: 10, **{
            ns: 3 for ns in namespaces if ns != namespace}}


def test_an_engine_running_as_a_tenant_stores_and_loads_in_its_tenants_namespace(make_daemon, models, reference):
    """The engine runs as the tenant's uid; the daemon knows it by SO_PEERCRED, gives it the tenant's
    arena part and namespace prefix, and the connector needs no tenant setting of its own."""
    uid = 40011
    daemon = make_daemon({**DAEMON, "server.socket_mode": "0666",
                          "tenant": [{"name": "team-x", "uids": [uid], "cpu_capacity": "16MiB"}]})
    shared = tempfile.mkdtemp(prefix="kvt-tenant-engine-")  # readable by the tenant's uid
    try:
        os.chmod(shared, 0o755)
        model = shutil.copytree(models[0], os.path.join(shared, "model"))
        for directory, _, files in os.walk(model):  # the copy keeps root's private modes
            os.chmod(directory, 0o755)
            for name in files:
                os.chmod(os.path.join(directory, name), 0o644)
        runs = []
        for name in ("t1", "t2"):
            work = os.path.join(shared, name)
            os.mkdir(work)
            os.chown(work, uid, uid)
            runs.append(run_engine(pathlib.Path(work), model, ["A"], daemon.socket, name, uid=uid))
        (first, stats1, _), (second, stats2, _) = runs
        assert stats1["saved_blocks"] == 3 and second[0]["num_cached_tokens"] == 3 * BLOCK
        assert first[0]["tokens"] == second[0]["tokens"] == reference["A"]
        (namespace, attributes), = _namespaces(daemon).items()
        assert namespace.startswith("team-x/vllm.") and attributes["model"] == model
        assert stats2["loaded_blocks"] == 3 and stats2["load_errors"] == 0
        assert f"local session for uid {uid} (tenant team-x, by its uid)" in daemon.log()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_restart_corruption_and_outage_never_change_tokens(make_daemon, models, reference, tmp_path):
    daemon = make_daemon(DAEMON)
    first, _, _ = run_engine(tmp_path, models[0], ["C", "E", "F", "G"], daemon.socket, "e1")
    keys = {name: [bytes.fromhex(k) for k in r["keys"]] for name, r in zip("CEFG", first)}
    (namespace,) = _namespaces(daemon)
    with daemon.client() as c:
        assert c.lookup(namespace, keys["C"] + keys["E"] + keys["F"] + keys["G"]).matched == 12  # the engine's keys
        c_middle = c.get_blocks(namespace, [keys["C"][1]])[0]
        # G's blocks replaced by F's KV under G's keys, with valid checksums: the connector cannot tell, so
        # an engine that really uses loaded KV (rather than recomputing) must now produce other tokens.
        f_blocks = c.get_blocks(namespace, keys["F"])
        assert c.delete(namespace, keys["G"]).deleted == 3
        c.put_blocks(namespace, [(k, p, d) for k, p, d in zip(keys["G"], [b""] + keys["G"][:2], f_blocks)],
                     wait_durable=True)
    assert daemon.stop() == 0                      # drains the write-through: every block is on disk
    daemon.flip_on_disk(c_middle)                # C's block 1: the disk tier quarantines it on read
    daemon.start()
    with daemon.client() as c:                     # E's block 1: corrupt the CPU copy behind the daemon's back
        lease = c.acquire(namespace, [keys["E"][1]])
        view = c.arena().view(lease.blocks[0].slot)
        view[100] = view[100] ^ 0xFF
        del view
        c.release(lease.id)

    second, stats, log = run_engine(tmp_path, models[0], ["F", "C", "E", "G"], daemon.socket, "e2")
    f, c_, e, g = second
    assert f["num_cached_tokens"] == 3 * BLOCK     # survived the daemon restart (disk tier)
    assert [r["tokens"] for r in second[:3]] == [reference["F"], reference["C"], reference["E"]]
    assert g["num_cached_tokens"] == 3 * BLOCK and g["tokens"] != reference["G"]  # loaded KV is what is used
    # C and E: blocks 0 and 2 load, block 1 fails (missing / checksum) and vLLM recomputes from there.
    assert stats["loaded_blocks"] == 3 + 2 + 2 + 3 and stats["load_errors"] == 2
    assert "checksum" in log
    assert stats["saved_blocks"] == 2              # the two bad blocks, recomputed, stored again
    with daemon.client() as c:
        assert c.stats().quarantined == 1
        every = keys["C"] + keys["E"] + keys["F"] + keys["G"]
        for key, data in zip(every, c.get_blocks(namespace, every)):
            assert data is not None and block_checksum(data) == c.stat(namespace, key).checksum

    daemon.kill()                                   # no daemon at all: the engine serves alone
    third, stats3, log3 = run_engine(tmp_path, models[0], ["F", "C"], daemon.socket, "e3")
    assert [r["num_cached_tokens"] for r in third] == [0, 0]
    assert [r["tokens"] for r in third] == [reference["F"], reference["C"]]
    assert stats3["loaded_blocks"] == 0 and stats3["save_errors"] > 0
    assert "kvtier: lookup failed" in log3


def test_a_hung_daemon_costs_one_deadline_per_connector_not_one_per_step(make_daemon, models, reference, tmp_path):
    """kvtierd SIGSTOPped (hung: its sockets accept, nothing answers) between two prompts of a running
    engine. Each connector (scheduler, worker) pays one deadline, its circuit breaker opens, and every
    later call fails fast: lookups miss, saves are dropped, the tokens are the reference's. After
    SIGCONT both breakers close by their health probes and hits resume."""
    daemon = make_daemon(DAEMON)
    prompts = ["A", {"name": "A", "sigstop": daemon.pid}, "T", "L", "C", "E",
               # continued: both breakers close (health probes), and A loads from kvtier again
               {"name": "A", "sigcont": daemon.pid, "wait_breaker_closed": True, "reset_prefix_cache": True}]
    try:
        results, worker, log = run_engine(tmp_path, models[0], prompts, daemon.socket, "hung",
                                          extra_config={"breaker_period_s": 1.0})
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    out = json.loads((tmp_path / "hung.out.json").read_text())
    scheduler, seconds = out["scheduler_stats"], [r["seconds"] for r in results]
    assert [r["tokens"] for r in results] == [reference[p] for p in ("A", "A", "T", "L", "C", "E", "A")]
    assert results[0]["num_cached_tokens"] == 0 and worker["saved_blocks"] >= 3  # stored before the hang
    # A again: from vLLM's own prefix cache; the rest computed (their lookups missed: the daemon is hung).
    assert [r["num_cached_tokens"] for r in results[1:6]] == [3 * BLOCK, 0, 0, 0, 0]
    # After SIGCONT and the breakers closed: A, with vLLM's prefix cache emptied, is loaded from kvtier.
    assert results[6]["num_cached_tokens"] == 3 * BLOCK and worker["loaded_blocks"] == 3, (results[6], worker)
    assert scheduler["breaker_closed"] == worker["breaker_closed"] == 1
    results, seconds = results[:6], seconds[:6]
    # One deadline per connector (scheduler: its short Lookup deadline; worker: one Allocate), then the
    # breaker is open for the rest of the run: the probes (every second) never get an answer.
    assert scheduler["daemon_timeouts"] == 1 and worker["daemon_timeouts"] == 1, (scheduler, worker)
    assert scheduler["breaker_opened"] == worker["breaker_opened"] == 1
    assert scheduler["short_circuited"] >= 4 and scheduler["lookup_errors"] == 5
    assert worker["short_circuited"] >= 4 and worker["save_errors"] > 0  # a save per step of T, L, C, E
    assert scheduler["health_probes"] >= 1 or worker["health_probes"] >= 1
    # Wall time: at most the two deadlines (1 s + 5 s) beyond the computation, not one per step
    # (before the breaker: 5 s per lookup and per saving step, about 100 s for these prompts).
    assert sum(seconds[1:]) < 1.0 + 5.0 + 15.0, seconds
    assert log.count("circuit breaker OPEN") == 2, log[-4000:]
    with daemon.client() as c:  # the daemon itself is fine once continued
        wait_for(lambda: c.stats() is not None, what="the daemon to answer")


def test_the_first_request_after_a_daemon_restart_loads_from_it(make_daemon, models, reference, tmp_path):
    """kvtierd stopped and started again (a new arena, new sessions) while the engine keeps running: the
    next request, with vLLM's own prefix cache emptied, loads its blocks from the restarted daemon."""
    daemon = make_daemon(DAEMON)
    go = tmp_path / "go"
    prompts = ["A", {"name": "A", "wait_for": str(go), "reset_prefix_cache": True}]
    spec = {"model": models[0], "socket": daemon.socket, "hash_algo": "sha256", "max_tokens": 8,
            "max_num_batched_tokens": 1024, "prompts": [_prompt(p) for p in prompts], "extra_config": {}}
    (tmp_path / "restart.spec.json").write_text(json.dumps(spec))
    engine = subprocess.Popen([sys.executable, os.path.join(HERE, "_vllm_engine.py"), str(tmp_path / "restart.spec.json"),
                               str(tmp_path / "restart.out.json")], env=_engine_env(), cwd=tmp_path,
                              stdout=open(tmp_path / "restart.log", "w"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (tmp_path / "go.waiting").exists() or engine.poll() is not None, timeout=300,
                 what="the engine to finish its first prompt")
        assert engine.poll() is None, (tmp_path / "restart.log").read_text()[-4000:]
        assert daemon.stop() == 0                    # drains the write-through: A's blocks are on disk
        daemon.start()
        go.touch()
        assert engine.wait(timeout=300) == 0, (tmp_path / "restart.log").read_text()[-4000:]
    finally:
        if engine.poll() is None:
            engine.kill()
    out = json.loads((tmp_path / "restart.out.json").read_text())
    first, second = out["results"]
    log = (tmp_path / "restart.log").read_text()
    assert first["num_cached_tokens"] == 0 and out["stats"]["saved_blocks"] == 3
    assert second["num_cached_tokens"] == 3 * BLOCK, log[-4000:]    # loaded from the restarted daemon
    assert out["stats"]["loaded_blocks"] == 3 and out["stats"]["load_errors"] == 0
    assert first["tokens"] == second["tokens"] == reference["A"]


def test_an_engine_started_while_the_daemon_was_down_loads_what_it_holds_once_up(make_daemon, models, reference,
                                                                                 tmp_path):
    """An engine started while kvtierd is down (its start neither fails nor waits for the daemon): once
    the daemon is up, with A's blocks on disk from an earlier engine, the engine's first request loads
    them, and what it stores then (C) is loaded back, with vLLM's own prefix cache emptied."""
    daemon = make_daemon(DAEMON)
    first, stats1, _ = run_engine(tmp_path, models[0], ["A"], daemon.socket, "e1")
    assert first[0]["num_cached_tokens"] == 0 and stats1["saved_blocks"] == 3
    assert daemon.stop() == 0                        # drains the write-through: A's blocks are on disk
    go = tmp_path / "go"
    prompts = [{"name": "A", "wait_for": str(go)}, "C",
               {"name": "C", "reset_prefix_cache": True}]
    # The breaker's health probe is left out of it (60 s): what must bring the connector back is the
    # daemon answering, not a probe that happens to come first.
    spec = {"model": models[0], "socket": daemon.socket, "hash_algo": "sha256", "max_tokens": 8,
            "max_num_batched_tokens": 1024, "prompts": [_prompt(p) for p in prompts],
            "extra_config": {"breaker_period_s": 60}}
    (tmp_path / "late.spec.json").write_text(json.dumps(spec))
    log_path = tmp_path / "late.log"
    engine = subprocess.Popen([sys.executable, os.path.join(HERE, "_vllm_engine.py"), str(tmp_path / "late.spec.json"),
                               str(tmp_path / "late.out.json")], env=_engine_env(), cwd=tmp_path,
                              stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (tmp_path / "go.waiting").exists() or engine.poll() is not None, timeout=300,
                 what="the engine to start with the daemon down")
        assert engine.poll() is None, log_path.read_text()[-4000:]
        daemon.start()                               # the same data dir
        go.touch()
        assert engine.wait(timeout=300) == 0, log_path.read_text()[-4000:]
    finally:
        if engine.poll() is None:
            engine.kill()
    out = json.loads((tmp_path / "late.out.json").read_text())
    late_a, c, c_again = out["results"]
    log = log_path.read_text()
    assert late_a["num_cached_tokens"] == 3 * BLOCK, log[-6000:]   # A, from what the daemon holds
    assert late_a["tokens"] == reference["A"]
    assert c["num_cached_tokens"] == 0 and c_again["num_cached_tokens"] == 3 * BLOCK, log[-6000:]
    assert c["tokens"] == c_again["tokens"] == reference["C"]
    worker, scheduler = out["stats"], out["scheduler_stats"]
    assert worker["saved_blocks"] == 3 and worker["loaded_blocks"] == 6, worker
    # The worker's breaker opened at start (no arena to map); the scheduler found A in the daemon, so the
    # load went through as a trial instead of failing until the next health probe (before: every step
    # a lookup and a failed load, thousands of each, for up to breaker_period_s).
    assert worker["load_errors"] == 0 and worker["breaker_opened"] == 1 and worker["breaker_open"] == 0, worker
    assert worker["breaker_trials"] == 1 and worker["health_probes"] == 0, worker
    assert scheduler["lookups"] < 10 and scheduler["lookup_errors"] == 0, scheduler


def test_blocks_saved_while_requests_are_preempted_hold_the_right_kv(make_daemon, models, reference, tmp_path):
    """Seven prompts at once in a KV cache of 34 blocks, each growing to 7: vLLM preempts some
    (their blocks are reused while saves of them may be copying: handle_preemptions stops those), and
    finished requests' blocks are held until their saves copied them. What was stored is right: a
    second engine loads every prompt's 3 blocks and produces the reference tokens."""
    daemon = make_daemon(DAEMON)
    names = ["A", "C", "E", "F", "G", "S", "T", "L"][:6] + ["B"]
    spec = {"model": models[0], "socket": daemon.socket, "hash_algo": "sha256", "max_tokens": 120,
            "max_num_batched_tokens": 1024, "prompts": [_prompt(n) for n in names], "extra_config": {},
            "kv_cache_memory_bytes": 34 * 32 * 1024, "batch": True}
    (tmp_path / "small.spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_vllm_engine.py"), str(tmp_path / "small.spec.json"),
                           str(tmp_path / "small.out.json")], env=_engine_env(), capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    out = json.loads((tmp_path / "small.out.json").read_text())
    assert out["scheduler_stats"]["preempted_requests"] > 0, "nothing was preempted: the test proves nothing"
    assert out["stats"]["saved_blocks"] > 0 and out["stats"]["save_errors"] == 0, out["stats"]
    second, stats, _ = run_engine(tmp_path, models[0], names, daemon.socket, "large")
    assert [r["tokens"] for r in second] == [reference[n] for n in names]
    assert [r["num_cached_tokens"] for r in second] == [3 * BLOCK] * 6 + [3 * BLOCK]
    assert stats["loaded_blocks"] == 3 * 7 - 2 and stats["load_errors"] == 0  # B shares A's first two


# -- agent hints ------------------------------------------------------------------------------------------
HINTED_DAEMON = {**DAEMON, "cpu.policy": "retention",
                 # Every call is at most 2 keys: the connector must batch by the daemon's ArenaInfo limit.
                 "limits.max_keys_per_request": 2, "peers.max_blocks_per_fetch": 2}
DEFAULT_HINTS = {"retention": {"class": "subagent", "priority": 30}}
PIN_1H = {"type": "ephemeral", "ttl": "1h"}


def _retention(info) -> tuple:
    r = info.retention
    return (r.cls, r.priority, r.ttl_s) if info.HasField("retention") else None


def test_agent_hints_set_the_retention_of_every_stored_block(make_daemon, models, reference, tmp_path):
    """kv_transfer_params["kvtier"] -> per-block Retention on commit (ranges, request default, decode blocks,
    connector defaults), read back from the daemon; bad hints change nothing but the retention; prefetch."""
    daemon = make_daemon(HINTED_DAEMON)
    system_then_conversation = {"kvtier": {
        "ranges": [{"tokens": 40, "class": "system", "priority": 90, "cache_control": PIN_1H}],
        "retention": {"class": "conversation", "priority": 80, "cache_control": {"type": "ephemeral"}},
        "osl": 8, "latency_sensitivity": 1.0}}                  # an unknown key: reported, ignored
    with_decode = {"kvtier": {"retention": {"class": "conversation", "priority": 60},
                              "decode": {"class": "decode", "priority": 0}}}
    bad = [{"kvtier": {"retention": {"class": "forever"}}},
           {"kvtier": "system please"},
           {"kvtier": {"osl": -1, "prefetch": "yes", "ranges": [{"tokens": 0}]}}]
    prompts = [{"name": "A", "kv_transfer_params": system_then_conversation},
               {"name": "E", "kv_transfer_params": with_decode, "max_tokens": 61},  # 161 tokens: 5 full blocks
               *({"name": "S", "kv_transfer_params": b} for b in bad),
               "C"]                                                                # no hints: the defaults
    first, stats, log = run_engine(tmp_path, models[0], prompts, daemon.socket, "e1",
                                   extra_config={"default_hints": DEFAULT_HINTS})
    a, e, s1, s2, s3, c = first
    assert [r["tokens"] for r in (a, s1, s2, s3, c)] == [reference[p] for p in "ASSSC"]
    assert e["tokens"][:8] == reference["E"] and len(e["keys"]) == 5
    assert stats["saved_blocks"] == 3 + 5 + 3 + 3 and stats["retained_blocks"] == 14
    assert stats["save_errors"] == 0 and stats["load_errors"] == 0
    assert log.count("kv_transfer_params['kvtier'] ignored, connector defaults used") == 3
    assert "retention.class must be one of" in log and "unknown hint keys ['latency_sensitivity']" in log

    (namespace,) = _namespaces(daemon)
    keys = {name: [bytes.fromhex(k) for k in r["keys"]] for name, r in zip("AESC", (a, e, s1, c))}
    with daemon.client() as client:
        got = {name: [client.stat(namespace, k) for k in ks] for name, ks in keys.items()}
    assert [_retention(i) for i in got["A"]] == [("system", 90, 3600.0)] * 2 + [("conversation", 80, 300.0)]
    assert [_retention(i) for i in got["E"]] == [("conversation", 60, 0.0)] * 4 + [("decode", 0, 0.0)]
    assert [_retention(i) for i in got["S"] + got["C"]] == [("subagent", 30, 0.0)] * 6
    pinned = [i.pinned_until_unix_ms - i.created_unix_ms for i in got["A"]]
    assert abs(pinned[0] - 3600e3) < 10e3 and abs(pinned[2] - 300e3) < 10e3
    assert all(i.pinned_until_unix_ms == 0 for i in got["E"] + got["C"])
    assert all(i.hits == 0 for name in "AC" for i in got[name])

    # A fresh engine: A asks for a prefetch; its blocks keep the retention they were stored with.
    second, stats2, _ = run_engine(tmp_path, models[0], [{"name": "A", "kv_transfer_params": {
        "kvtier": {"prefetch": True, "retention": {"class": "ephemeral"}}}}, "C"], daemon.socket, "e2",
        extra_config={"default_hints": DEFAULT_HINTS})
    assert [r["num_cached_tokens"] for r in second] == [3 * BLOCK, 3 * BLOCK]
    assert [r["tokens"] for r in second] == [reference["A"], reference["C"]]
    assert stats2["loaded_blocks"] == 6 and stats2["saved_blocks"] == 0 and stats2["load_errors"] == 0
    with daemon.client() as client:
        again = {name: [client.stat(namespace, k) for k in keys[name]] for name in "AC"}
    assert [_retention(i) for i in again["A"]] == [_retention(i) for i in got["A"]]
    assert [i.hits for i in again["A"]] == [2, 2, 2]   # the prefetch's read and the load's
    assert [i.hits for i in again["C"]] == [1, 1, 1]   # the load's only


def test_an_engine_on_another_node_loads_a_prefix_pulled_from_its_peer(make_daemon, models, reference, tmp_path):
    """One prefill, then a load on another node: its daemon pulls the blocks from the first node's
    daemon (NIXL) on the lookup, verifies them, and the engine loads them from local shared memory."""
    authority, ports = Authority(tmp_path / "pki"), [free_port(), free_port()]
    node_a, node_b = (make_daemon({**DAEMON, **peer_overrides(authority, ports, i, "nixl")}, name=f"node{i}")
                      for i in range(2))
    first, stats1, _ = run_engine(tmp_path, models[0], ["A"], node_a.socket, "on-a")
    assert stats1["saved_blocks"] == 3 and first[0]["tokens"] == reference["A"]
    second, stats2, _ = run_engine(tmp_path, models[0], ["A"], node_b.socket, "on-b",
                                   extra_config={"consult_peers": True})
    assert second[0]["num_cached_tokens"] == 3 * BLOCK  # no prefill on node b
    assert second[0]["tokens"] == reference["A"]
    assert stats2["loaded_blocks"] == 3 and stats2["saved_blocks"] == 0
    with node_b.client() as c:
        (namespace,) = [n.name for n in c.list_namespaces()]
        assert [b.tiers & pb.TIER_CPU for b in c.iter_inventory(namespace)] == [pb.TIER_CPU] * 3
    assert "NIXL agent" in node_b.log()


def test_random_root_hash_is_refused(make_daemon, models, tmp_path):
    """xxhash without PYTHONHASHSEED: vLLM seeds NONE_HASH randomly per process; the connector refuses."""
    daemon = make_daemon(DAEMON)
    code, log = run_engine(tmp_path, models[0], ["A"], daemon.socket, "xx", hash_algo="xxhash", hash_seed=None,
                           check=False)
    assert code != 0
    assert "HashSeedError" in log and "Set PYTHONHASHSEED" in log
    assert _namespaces(daemon) == {}


def test_block_layout_round_trips_any_block_major_layout():
    import torch
    from kvtier.connectors._layout import BlockLayout

    num_blocks = 6
    caches = {
        "l1": torch.randn(num_blocks, 2, 32, 64),                         # CPU: (blocks, heads, tokens, 2*head)
        "l0": torch.randn(2, num_blocks, 32, 2, 16),                      # K/V split first
        "l2": torch.randn(num_blocks * 2, 4, 8).to(torch.bfloat16),       # two kernel blocks per block
        "l3": torch.randn(num_blocks, 32, 2, 16).permute(0, 2, 1, 3),     # strided (head-major view)
    }
    layout = BlockLayout(caches, num_blocks)
    assert [p.name for p in layout.parts] == ["l0/k", "l0/v", "l1", "l2", "l3"]
    assert layout.block_bytes == 2 * 32 * 2 * 16 * 4 + 2 * 32 * 64 * 4 + 2 * 4 * 8 * 2 + 32 * 2 * 16 * 4
    buffer = bytearray(layout.block_bytes)
    layout.pack(3, memoryview(buffer))
    before = {name: t.clone() for name, t in caches.items()}
    layout.unpack(memoryview(buffer), 5)
    assert torch.equal(caches["l1"][5], before["l1"][3]) and torch.equal(caches["l1"][:5], before["l1"][:5])
    assert torch.equal(caches["l0"][:, 5], before["l0"][:, 3])
    assert torch.equal(caches["l2"][10:12], before["l2"][6:8])
    assert torch.equal(caches["l3"][5], before["l3"][3])
    assert bytes(buffer[:8]) == caches["l0"][0, 3].contiguous().view(torch.uint8).flatten()[:8].numpy().tobytes()
    with pytest.raises(ValueError, match="blocks"):
        BlockLayout({"x": torch.zeros(7, 3)}, num_blocks)


@pytest.mark.parametrize("slot_bytes", [16384, 16384 + 3])  # +3: not whole elements, per-slot tensors
def test_arena_views_copy_the_same_bytes_as_per_block_packing(slot_bytes):
    import mmap

    import torch
    from kvtier.connectors._layout import BlockLayout

    num_blocks, slot_count = 6, 5
    caches = {"a": torch.randn(num_blocks, 2, 32, 16), "b": torch.randn(2, num_blocks, 8, 4).to(torch.bfloat16),
              "c": torch.randn(num_blocks * 2, 3, 5)}
    layout = BlockLayout(caches, num_blocks)
    arena = mmap.mmap(-1, slot_bytes * slot_count)
    views = layout.arena_views(arena, slot_bytes, slot_count)
    views.pack([4, 1, 2], [0, 3, 4])
    for block_id, slot in ((4, 0), (1, 3), (2, 4)):
        want = bytearray(layout.block_bytes)
        layout.pack(block_id, memoryview(want))
        assert arena[slot * slot_bytes:slot * slot_bytes + layout.block_bytes] == want
    before = {name: t.clone() for name, t in caches.items()}
    views.unpack([3, 0], [5, 0])  # block 1's bytes into block 5, block 4's into block 0
    assert torch.equal(caches["a"][5], before["a"][1]) and torch.equal(caches["a"][0], before["a"][4])
    assert torch.equal(caches["b"][:, 5], before["b"][:, 1]) and torch.equal(caches["c"][10:12], before["c"][2:4])
    assert torch.equal(caches["a"][1:5], before["a"][1:5])
    with pytest.raises(IndexError):
        views.pack([0], [slot_count])
    with pytest.raises(ValueError, match="slot size"):
        layout.arena_views(arena, 64, slot_count)
    del views
    arena.close()  # the views were the only export
