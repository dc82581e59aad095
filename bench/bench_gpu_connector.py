"""The engine connector's GPU path through a real kvtierd, against pinned cudaMemcpy, on a
Llama-8B-shaped paged KV cache; and the engine step time with asynchronous saves vs no connector.

ONE COMMAND on a GPU machine that has torch with CUDA and numpy (Python >= 3.11; nothing else of ours):

    python3 bench/bench_gpu_connector.py                  # results in bench/out/gpu_connector.{json,md,png}
    PYTHONUNBUFFERED=1 python3 bench/bench_gpu_connector.py --out "$OUT"   # the device tool, with
                                                          # carry: ["bench/gpu-wheels"]

It needs bench/gpu-wheels/, built beforehand on a machine with PyPI (`make gpu-wheels`, under a
minute; git-ignored, < 60 MiB; rebuild it after changing the code: the kvtier wheel is a snapshot).
When this Python cannot import kvtier, the bench makes a venv in a temp dir (--system-site-packages,
plus the site dirs of the Python that started it, so the machine's torch is used even when that
Python is itself a venv, as on the device image), installs the wheelhouse into it with
`pip install --no-index --find-links --no-deps --ignore-installed` (the venv's own copies win over
the machine's grpcio/protobuf), re-runs itself there and removes the venv afterwards.
Without a CUDA device it says so and exits 2; `--device cpu` runs everything on the CPU with small
sizes (a smoke test of the code paths, not a result). Exit status: 0 done (goals met or not),
1 a block failed verification or a save/load failed, 2 cannot run here, 124 past the time limit.

    .venv-sys/bin/python bench/bench_gpu_connector.py --device cpu
    python3 bench/bench_gpu_connector.py --wheelhouse-check   # install + start kvtierd + 4 blocks; no torch

What it measures (the KV cache: per layer one tensor (2, num_blocks, 16, 8, 128) bf16, vLLM's
flash-attention layout; 32 layers make a block of 16 tokens 2 MiB; the daemon's arena has 2 MiB
slots, a disk tier on a temp dir, no GPU tier):

1. Bandwidth, `--rounds` rounds after `--warmup`, each round on fresh random data and new keys:
   - save: `--blocks` blocks (default 512 = 1 GiB, shuffled block ids) as one job of the connector's
     TransferEngine: Allocate -> ArenaViews.pack on the CopyStream (gather on the device, D2H into
     the pinned arena) -> xxh3 per block -> Commit (the daemon verifies every checksum); timed from
     submit_save until the engine is idle;
   - load: the same keys into other blocks of the cache (TransferEngine load job: Acquire -> xxh3
     verify -> ArenaViews.unpack on the CopyStream -> Release), timed likewise;
   - verify: every loaded block is compared byte for byte with its source block (a mismatch, a
     missing block or a failed save fails the bench);
   - the limit, right after: the same bytes between the same cache tensors and ONE pinned host
     tensor (torch pin_memory = cudaHostAlloc), one `copy_(non_blocking=True)` per layer half
     (64 copies of 16 MiB), then synchronize; D2H and H2D. Also one single copy of the whole round
     (the DMA ceiling), informative.
   Between rounds (untimed) the round's blocks are deleted from the daemon (waiting until the disk
   write-through let go of them), so every save starts with the same free arena.
2. Engine steps: a simulated Llama-8B prefill step of `--step-tokens` tokens (per layer the qkv,
   o, gate/up and down matmuls of an 8B layer, weights shared by all layers, and the new K/V
   written into `--step-tokens`/16 fresh blocks of the cache), then the stream synchronises as an
   engine does to sample. "No connector": nothing else. "Async saves": after each step's forward
   the step's newly full blocks are handed to TransferEngine.submit_save (as the vLLM connector's
   wait_for_save does); the copies run on the CopyStream while the next steps compute. Step time
   median (and mean) of each mode, the modes alternate in blocks of `--steps` steps.

Every phase is bounded (`--phase-seconds`), and the whole run too (`--time-limit`, from the first
start, the self-install included): past it the bench kills kvtierd and exits 124.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_WHEELS = BENCH_DIR / "gpu-wheels"
NAME = "gpu_connector"
TITLE = "Connector GPU path through kvtierd vs pinned cudaMemcpy"
ENV_VENV = "KVTIER_BENCH_VENV"        # set in the re-executed child: the venv it runs in
ENV_T0 = "KVTIER_BENCH_T0"            # wall-clock start of the first process (the time limit counts from it)
ENV_FORCE = "KVTIER_BENCH_SELF_INSTALL"  # "1": install from the wheelhouse even if kvtier imports
GIB = 1 << 30
MIB = 1 << 20

# Llama-3-8B: hidden 4096, 32 query heads, 8 KV heads of 128, MLP 14336, 32 layers; vLLM block 16.
GPU_DEFAULTS = dict(blocks=512, layers=32, rounds=5, warmup=1, hidden=4096, ffn=14336, step_tokens=512,
                    steps=50, reps=2, ring_blocks=1024)
CPU_DEFAULTS = dict(blocks=16, layers=2, rounds=2, warmup=1, hidden=256, ffn=512, step_tokens=64,
                    steps=6, reps=1, ring_blocks=64)
KV_HEADS, HEAD_SIZE, BLOCK_TOKENS = 8, 128, 16


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default; exits 2 without a CUDA device), cuda:N, "
                   "or cpu (a smoke test with small defaults)")
    p.add_argument("--blocks", type=int, help="blocks per save/load round (default 512 on CUDA, 16 on CPU)")
    p.add_argument("--layers", type=int, help="layers of the KV cache (default 32 on CUDA, 2 on CPU)")
    p.add_argument("--rounds", type=int, help="timed bandwidth rounds (default 5 on CUDA, 2 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed bandwidth rounds first (default 1)")
    p.add_argument("--hidden", type=int, help="hidden size of the simulated step (default 4096 / 256)")
    p.add_argument("--ffn", type=int, help="MLP size of the simulated step (default 14336 / 512)")
    p.add_argument("--step-tokens", type=int, help="tokens per simulated step, a multiple of 16 "
                   "(default 512 = 32 new blocks per step / 64 on CPU)")
    p.add_argument("--steps", type=int, help="timed steps per mode and repetition (default 50 / 6)")
    p.add_argument("--reps", type=int, help="repetitions of (no connector, async saves) (default 2 / 1)")
    p.add_argument("--ring-blocks", type=int, help="cache blocks the steps cycle through (default 1024 / 64)")
    p.add_argument("--arena", help="kvtierd cpu.capacity (default: room for a round and for every block "
                   "the step phase saves, + 512 MiB: 7.9 GiB on CUDA, so nothing is evicted mid-measurement)")
    p.add_argument("--no-disk", action="store_true", help="no disk tier (default: a disk tier on a temp dir)")
    p.add_argument("--disk-capacity", default="4GiB", help="disk.capacity (default 4GiB)")
    p.add_argument("--work-dir", help="where the daemon's data dir goes (default: a new temp dir, removed)")
    p.add_argument("--max-inflight", type=int, default=1 << 30,
                   help="TransferEngine max_inflight_bytes in the step phase (default 1 GiB, the connector's)")
    p.add_argument("--phase-seconds", type=float, default=75.0, help="bound on each phase (default 75 s)")
    p.add_argument("--time-limit", type=float, default=285.0,
                   help="bound on the whole run from the first start, install included (default 285 s)")
    p.add_argument("--skip-steps", action="store_true", help="bandwidth only")
    p.add_argument("--wheels", default=str(DEFAULT_WHEELS), help="the wheelhouse (default bench/gpu-wheels)")
    p.add_argument("--self-install", action="store_true",
                   help=f"install from the wheelhouse even if kvtier imports (also {ENV_FORCE}=1)")
    p.add_argument("--keep-venv", action="store_true", help="leave the temp venv in place (its path is printed)")
    p.add_argument("--wheelhouse-check", action="store_true",
                   help="only install (if needed), start kvtierd and save+load 4 blocks through it; no torch")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default=str(BENCH_DIR / "out"), help="output dir for JSON/Markdown/PNG (default bench/out)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return p, p.parse_args(argv)


# ============================== bootstrap: the wheelhouse venv ==============================
def kvtier_importable() -> tuple[bool, str]:
    try:
        import kvtier.client.process  # noqa: F401, PLC0415
        import kvtier.connectors._daemon  # noqa: F401, PLC0415
        import kvtier.connectors._pipeline  # noqa: F401, PLC0415
        import kvtier.daemon.main  # noqa: F401, PLC0415
    except Exception as error:  # noqa: BLE001 - anything missing or broken: use the wheelhouse
        return False, f"{type(error).__name__}: {error}"
    return True, ""


def parent_site_dirs() -> list[str]:
    """This Python's site dirs (where torch is), for the venv to see after its own: a venv made
    from a venv's python gets the BASE interpreter's site-packages from --system-site-packages.
    Added with site.addsitedir, so their .pth files extend the path as they do here."""
    import site  # noqa: PLC0415
    dirs: list[str] = []
    try:
        dirs += site.getsitepackages()
    except AttributeError:
        pass
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    seen: list[str] = []
    for d in dirs:
        if d and os.path.isdir(d) and d not in seen:
            seen.append(d)
    return seen


def wheel_pins(wheels: Path) -> list[str]:
    """name==version of every distribution in the wheelhouse (one version each)."""
    pins: dict[str, str] = {}
    for path in sorted(wheels.glob("*.whl")):
        dist, version = path.name.split("-")[:2]
        pins[dist.replace("_", "-").lower()] = version
    if "numpy" in pins:
        import importlib.util  # noqa: PLC0415
        if importlib.util.find_spec("numpy") is not None:
            del pins["numpy"]  # keep the machine's numpy, which its torch was used with
    return [f"{name}=={version}" for name, version in pins.items()]


def self_install(args, argv, why: str) -> int:
    """Makes the venv, installs the wheelhouse, re-runs this script in it; returns its exit code."""
    wheels = Path(args.wheels).resolve()
    if not any(wheels.glob("kvtier-*.whl")):
        log(f"kvtier is not importable here ({why}) and there is no wheelhouse at {wheels}: build it on a "
            "machine with PyPI access (`make gpu-wheels`) and bring bench/gpu-wheels along")
        return 2
    import importlib.util  # noqa: PLC0415
    if importlib.util.find_spec("numpy") is None and not any(wheels.glob("numpy-*.whl")):
        log(f"{sys.executable} has no numpy, which kvtierd needs (its disk tier), and the wheelhouse has none: "
            f"rebuild it here with GPU_WHEELS_NUMPY=1 GPU_WHEELS_PYTHONS='{sys.version_info.major}."
            f"{sys.version_info.minor}' make gpu-wheels")
        return 2
    info = wheels / "BUILD-INFO.txt"
    log(("installing the wheelhouse as asked" if why.startswith(ENV_FORCE) else
         f"kvtier is not importable here ({why}); installing") + f" {wheels}"
        + (f" [{'; '.join(info.read_text().split(chr(10))[:2])}]" if info.exists() else ""))
    started = time.monotonic()
    venv = Path(tempfile.mkdtemp(prefix="kvtier-gpu-bench-venv-"))
    try:
        made = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                              capture_output=True, text=True)
        own_pip = made.returncode == 0
        if not own_pip:  # no ensurepip (Debian without python3-venv): the parent's pip installs instead
            log(f"python -m venv with pip failed ({made.stderr.strip().splitlines()[-1:]}); trying --without-pip")
            shutil.rmtree(venv, ignore_errors=True)
            made = subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages",
                                   str(venv)], capture_output=True, text=True)
            if made.returncode != 0:
                log(f"cannot create a venv with {sys.executable}:\n{made.stderr}")
                return 2
        python = venv / "bin" / "python"
        site_dir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip()
        parents = parent_site_dirs()
        Path(site_dir, "_kvtier_bench_parent_site.pth").write_text(
            "import site; list(map(site.addsitedir, " + repr(parents) + "))\n")
        pins = wheel_pins(wheels)
        pip = [str(python), "-m", "pip"] if own_pip else [sys.executable, "-m", "pip"]
        cmd = [*pip, "install", "-q", "--no-index", "--find-links", str(wheels), "--no-deps",
               "--ignore-installed", "--disable-pip-version-check", "--no-cache-dir", *pins]
        if not own_pip:
            cmd += ["--target", site_dir]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            log(f"pip could not install the wheelhouse for Python {sys.version.split()[0]}:\n{done.stderr.strip()}\n"
                "If a wheel for this Python is missing, rebuild it here with "
                f"GPU_WHEELS_PYTHONS='{sys.version_info.major}.{sys.version_info.minor}' make gpu-wheels")
            return 2
        log(f"installed {len(pins)} distributions in {time.monotonic() - started:.1f} s into {venv} "
            f"(Python {sys.version.split()[0]}; the machine's packages from {parents})")
        env = {**os.environ, ENV_VENV: str(venv)}
        env.pop(ENV_FORCE, None)
        remaining = args.time_limit - (time.time() - float(os.environ[ENV_T0]))
        child = subprocess.Popen([str(python), str(Path(__file__).resolve()), *argv], env=env, start_new_session=True)
        try:
            return child.wait(timeout=max(1.0, remaining + 20))  # the child enforces the limit itself first
        except subprocess.TimeoutExpired:
            log("the bench outlived its time limit: killing it and its kvtierd")
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            return 124
        except KeyboardInterrupt:
            os.killpg(child.pid, signal.SIGTERM)
            child.wait()
            return 130
    finally:
        if args.keep_venv:
            log(f"venv kept at {venv}")
        else:
            shutil.rmtree(venv, ignore_errors=True)


# ============================== the watchdog ==============================
class Watchdog:
    """Past the run's time limit: says where it was, kills kvtierd, exits 124."""

    def __init__(self, limit_s: float):
        self.deadline = float(os.environ[ENV_T0]) + limit_s
        self.limit_s = limit_s
        self.phase = "start"
        self.daemon = None
        self.work_dir: Path | None = None  # a temp dir of ours, removed on the way out
        thread = threading.Thread(target=self._watch, daemon=True, name="bench-watchdog")
        thread.start()

    def left(self) -> float:
        return self.deadline - time.time()

    def _watch(self) -> None:
        while self.left() > 0:
            time.sleep(min(1.0, max(0.05, self.left())))
        log(f"TIME LIMIT: {self.limit_s:.0f} s reached during phase '{self.phase}'; killing kvtierd, exiting 124")
        if self.daemon is not None:
            try:
                self.daemon.kill()
            except Exception:  # noqa: BLE001
                pass
        if self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        os._exit(124)


# ============================== helpers ==============================
def gib_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / GIB


def median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


def key_of(run: bytes, *parts) -> bytes:
    return hashlib.blake2b(run + repr(parts).encode(), digest_size=16).digest()


def make_session_class():
    from kvtier.connectors._daemon import DaemonSession  # noqa: PLC0415

    class TimedSession(DaemonSession):
        """DaemonSession that adds up the seconds spent in each RPC (by name), for the breakdown."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.rpc_seconds: dict[str, float] = {}
            self._rpc_lock = threading.Lock()

        def call(self, name, request, timeout=None):
            start = time.perf_counter()
            try:
                return super().call(name, request, timeout)
            finally:
                with self._rpc_lock:
                    self.rpc_seconds[name] = self.rpc_seconds.get(name, 0.0) + time.perf_counter() - start

        def take_rpc_seconds(self) -> dict[str, float]:
            with self._rpc_lock:
                out, self.rpc_seconds = self.rpc_seconds, {}
            return out
    return TimedSession


def daemon_overrides(args, slot_bytes: int, capacity: int) -> dict:
    """2 MiB slots, no GPU tier; a disk tier (write-through, in the background) whose backlog bound is
    the whole arena, so that Allocate never waits for the disk in the middle of a measurement."""
    over = {"cpu.capacity": capacity, "cpu.slot_bytes": slot_bytes, "gpu.enabled": False}
    if args.no_disk:
        over["disk.enabled"] = False
    else:
        over.update({"disk.enabled": True, "disk.capacity": args.disk_capacity,
                     "disk.segment_bytes": max(256 * MIB, 4 * slot_bytes),
                     "disk.queue_blocks": max(1024, capacity // slot_bytes)})
    return over


def drain(session, namespace: str, keys: list[bytes], seconds: float) -> tuple[int, float]:
    """Deletes `keys`, retrying those still busy (disk write-through) for at most `seconds`."""
    from kvtier.proto.v1 import kvtier_pb2 as pb  # noqa: PLC0415
    start = time.monotonic()
    deleted = 0
    while True:
        reply = session.call("Delete", pb.DeleteRequest(namespace=namespace, keys=keys), timeout=30.0)
        deleted += reply.deleted
        if not reply.busy or time.monotonic() - start > seconds:
            return reply.busy, time.monotonic() - start
        time.sleep(0.05)


# ============================== --wheelhouse-check ==============================
def wheelhouse_check(args) -> int:
    """kvtierd from the installed wheel, a session, 4 blocks saved and loaded back; no torch."""
    import grpc  # noqa: PLC0415
    import google.protobuf  # noqa: PLC0415

    import kvtier.daemon  # noqa: PLC0415
    from kvtier.connectors._pipeline import BlockToSave, load_blocks, save_blocks  # noqa: PLC0415
    from kvtier.proto.v1 import kvtier_pb2 as pb  # noqa: PLC0415
    from _daemon import BenchDaemon  # noqa: PLC0415

    log(f"Python {sys.version.split()[0]}, kvtier from {Path(kvtier.daemon.__file__).parent.parent}, "
        f"grpcio {grpc.__version__}, protobuf {google.protobuf.__version__}")
    slot = 64 * 1024
    with tempfile.TemporaryDirectory(prefix="kvtier-wheelhouse-check-") as work:
        overrides = {"cpu.capacity": 64 * slot, "cpu.slot_bytes": slot, "disk.enabled": True,
                     "disk.capacity": "64MiB", "disk.segment_bytes": 4 * slot}
        with BenchDaemon(work, overrides) as daemon:
            session = make_session_class()(daemon.socket, 10.0, {"wheelhouse-check": {"model": "none"}})
            try:
                session.ensure_namespaces()
                payloads = [os.urandom(slot) for _ in range(4)]
                keys = [key_of(b"check", i) for i in range(4)]

                def fill(arena, slots):
                    for slot_id, data in zip(slots, payloads):
                        arena.view(slot_id)[:len(data)] = data
                statuses = save_blocks(session, "wheelhouse-check",
                                       [BlockToSave(k, b"", slot) for k in keys], fill, allocate_wait_ms=1000)
                got: dict[int, bytes] = {}
                outcome = load_blocks(session, "wheelhouse-check", keys, slot, lambda arena, verified: got.update(
                    {i: bytes(arena.view(block.slot)[:block.length]) for i, block in verified}))
            finally:
                session.close()
    ok = all(s == pb.STORED for s in statuses) and all(outcome.loaded) and \
        all(got.get(i) == payloads[i] for i in range(4))
    log(f"wheelhouse check: kvtierd started, 4 blocks saved {'and loaded back byte-identical' if ok else 'BUT NOT'}"
        f" (statuses {list(statuses)}, loaded {outcome.loaded})")
    return 0 if ok else 1


# ============================== the bench ==============================
class Bench:
    def __init__(self, args, torch, device, dog: Watchdog):
        from kvtier.connectors._layout import BlockLayout, CopyStream  # noqa: PLC0415
        self.args, self.torch, self.device, self.dog = args, torch, device, dog
        self.cuda = device.type == "cuda"
        B, L = args.blocks, args.layers
        self.num_blocks = 2 * B + args.ring_blocks
        shape = (2, self.num_blocks, BLOCK_TOKENS, KV_HEADS, HEAD_SIZE)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        self.gen = gen
        self.kv = {f"model.layers.{i}.self_attn.attn": torch.randn(shape, dtype=torch.bfloat16, device=device,
                                                                    generator=gen) for i in range(L)}
        self.layout = BlockLayout(self.kv, self.num_blocks)
        self.block_bytes = self.layout.block_bytes
        self.copies = CopyStream(device)
        self.run_id = os.urandom(8)

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def stream_sync(self):
        """What an engine waits for before sampling: its own stream, not the copy stream."""
        if self.cuda:
            self.torch.cuda.current_stream(self.device).synchronize()

    def views(self, arena):
        if getattr(self, "_views_of", None) is not arena:
            self._views = self.layout.arena_views(arena.buffer, arena.slot_bytes, arena.slot_count, arena.first_slot)
            self._views_of = arena
        return self._views

    # -- phase 1 --------------------------------------------------------------------------------
    def bandwidth(self, session, namespace: str, engine) -> dict:
        from kvtier.client.client import block_checksum  # noqa: PLC0415
        from kvtier.connectors._pipeline import BlockToSave, load_blocks, save_blocks  # noqa: PLC0415
        from kvtier.proto.v1 import kvtier_pb2 as pb  # noqa: PLC0415
        torch, args = self.torch, self.args
        B, nbytes = args.blocks, args.blocks * self.block_bytes
        parts = self.layout.parts
        # The limit's host memory: one pinned tensor holding a round, part after part.
        host = torch.empty(nbytes, dtype=torch.uint8)
        if self.cuda:
            host = host.pin_memory()
        host_parts, offset = [], 0
        for part in parts:
            size = B * part.nbytes
            host_parts.append(host[offset:offset + size].view(part.tensor.dtype).view(part.tensor[:B].shape))
            offset += size
        flat_dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device)  # for the one-copy ceiling
        rounds, errors = [], []
        verified_blocks = checked_blocks = 0
        phase_end = time.monotonic() + args.phase_seconds
        total_rounds = args.warmup + args.rounds
        for r in range(total_rounds):
            if r > args.warmup and time.monotonic() > phase_end:
                log(f"bandwidth: phase bound of {args.phase_seconds:.0f} s reached after {r - args.warmup} timed rounds")
                break
            perm = torch.randperm(B, generator=torch.Generator().manual_seed(args.seed + r)).tolist()
            src_ids = perm                                   # the blocks saved, in a shuffled order
            dst_ids = [B + b for b in reversed(perm)]        # where they are loaded back
            keys = [key_of(self.run_id, "bw", r, i) for i in range(B)]
            blocks = [BlockToSave(k, keys[i - 1] if i else b"", self.block_bytes) for i, k in enumerate(keys)]
            for kv in self.kv.values():                      # fresh data; the destination zeroed
                kv[:, :B].normal_(generator=self.gen)
                kv[:, B:2 * B].zero_()
            self.sync()
            session.take_rpc_seconds()
            timing = {"copy_in": 0.0, "copy_out": 0.0}
            outcome_box = {}

            # save: one TransferEngine job, as the vLLM connector's _save runs it
            def save_run(job, after):
                def fill(arena, slots):
                    views = self.views(arena)
                    job.start_copy()
                    try:
                        t = time.perf_counter()
                        self.copies.run(after, lambda: views.pack(src_ids, slots))
                        timing["copy_in"] += time.perf_counter() - t
                    finally:
                        job.end_copy()
                outcome_box["statuses"] = save_blocks(session, namespace, blocks, fill, allocate_wait_ms=10000)
            t0 = time.perf_counter()
            after = self.copies.mark()
            if not engine.submit_save(f"bw-save-{r}", nbytes, lambda job, after=after: save_run(job, after)):
                raise SystemExit("bench: TransferEngine dropped the bandwidth save (in-flight bound)")
            if not engine.wait_idle(args.phase_seconds):
                raise SystemExit("bench: the save did not finish within the phase bound")
            save_s = time.perf_counter() - t0
            save_rpcs = session.take_rpc_seconds()
            statuses = outcome_box.get("statuses", [])
            if len(statuses) != B or any(s != pb.STORED for s in statuses):
                errors.append(f"round {r}: save statuses {sorted(set(statuses))} for {len(statuses)} of {B} blocks"
                              f" (job failures: {engine.stats['save_jobs_failed']})")
                break

            # load: one TransferEngine load job into other blocks, as the connector's _load runs it
            def load_run(after):
                def consume(arena, verified):
                    views = self.views(arena)
                    slots = [block.slot for _, block in verified]
                    ids = [dst_ids[i] for i, _ in verified]
                    t = time.perf_counter()
                    self.copies.run(after, lambda: views.unpack(slots, ids))
                    timing["copy_out"] += time.perf_counter() - t
                outcome = load_blocks(session, namespace, keys, self.block_bytes, consume)
                outcome_box["load"] = outcome
                return [dst_ids[i] for i, ok in enumerate(outcome.loaded) if not ok]
            t0 = time.perf_counter()
            after = self.copies.mark()
            engine.submit_load(f"bw-load-{r}", dst_ids, lambda after=after: load_run(after))
            if not engine.wait_idle(args.phase_seconds):
                raise SystemExit("bench: the load did not finish within the phase bound")
            load_s = time.perf_counter() - t0
            load_rpcs = session.take_rpc_seconds()
            load_errors = engine.take_load_errors()
            engine.finished([])  # report (and forget) the ended load

            # verify every block byte for byte against its source
            bad = torch.zeros(B, dtype=torch.bool, device=self.device)
            src_t = torch.tensor(src_ids, device=self.device)
            dst_t = torch.tensor(dst_ids, device=self.device)
            for part in parts:
                a = part.tensor.index_select(0, src_t).view(torch.int16).reshape(B, -1)
                b = part.tensor.index_select(0, dst_t).view(torch.int16).reshape(B, -1)
                bad |= (a != b).any(dim=1)
            mismatched = int(bad.sum())
            checked_blocks += B
            verified_blocks += B - mismatched
            outcome = outcome_box.get("load")
            if mismatched or load_errors or outcome is None or not all(outcome.loaded):
                errors.append(f"round {r}: {mismatched} of {B} blocks differ after the round trip; "
                              f"{len(load_errors)} load errors; " + (
                                  f"{sum(outcome.loaded)} of {B} loaded, {outcome.missing} missing, "
                                  f"{len(outcome.wrong_length)} of a wrong length, {len(outcome.corrupt)} corrupt"
                                  if outcome is not None else "the load job failed"))
                break

            # the limit: the same bytes, same tensors, one pinned host tensor
            self.sync()
            t0 = time.perf_counter()
            for part, h in zip(parts, host_parts):
                h.copy_(part.tensor[:B], non_blocking=self.cuda)
            self.sync()
            d2h_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for part, h in zip(parts, host_parts):
                part.tensor[B:2 * B].copy_(h, non_blocking=self.cuda)
            self.sync()
            h2d_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            host.copy_(flat_dev, non_blocking=self.cuda)
            self.sync()
            one_d2h_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            flat_dev.copy_(host, non_blocking=self.cuda)
            self.sync()
            one_h2d_s = time.perf_counter() - t0

            # the client's checksum alone: xxh3_64 of the same bytes, 2 MiB at a time (as save_blocks does)
            whole = memoryview(host.numpy()).cast("B")
            t0 = time.perf_counter()
            for at in range(0, nbytes, self.block_bytes):
                block_checksum(whole[at:at + self.block_bytes])
            xxh3_s = time.perf_counter() - t0
            whole.release()

            busy, drain_s = drain(session, namespace, keys, min(60.0, max(1.0, self.dog.left() - 60)))
            session.take_rpc_seconds()
            record = {"round": r, "timed": r >= args.warmup, "save s": save_s, "save GiB/s": gib_s(nbytes, save_s),
                      "pack s": timing["copy_in"], "Allocate s": save_rpcs.get("Allocate", 0.0),
                      "Commit s": save_rpcs.get("Commit", 0.0), "load s": load_s,
                      "load GiB/s": gib_s(nbytes, load_s), "unpack s": timing["copy_out"],
                      "Acquire s": load_rpcs.get("Acquire", 0.0), "Release s": load_rpcs.get("Release", 0.0),
                      "D2H s": d2h_s, "H2D s": h2d_s, "one D2H s": one_d2h_s, "one H2D s": one_h2d_s,
                      "xxh3 s": xxh3_s,
                      "drain s": drain_s, "left busy": busy}
            rounds.append(record)
            log(f"bandwidth round {r}{'' if record['timed'] else ' (warm-up)'}: save {record['save GiB/s']:.2f} GiB/s "
                f"(pack {gib_s(nbytes, timing['copy_in']):.2f}), load {record['load GiB/s']:.2f} GiB/s (unpack "
                f"{gib_s(nbytes, timing['copy_out']):.2f}), limit D2H {gib_s(nbytes, d2h_s):.2f} H2D "
                f"{gib_s(nbytes, h2d_s):.2f} GiB/s; {B - mismatched}/{B} blocks verified; drained in {drain_s:.2f} s")
        del flat_dev, host, host_parts
        return {"rounds": rounds, "errors": errors, "verified": verified_blocks, "checked": checked_blocks,
                "nbytes": nbytes}

    # -- phase 2 --------------------------------------------------------------------------------
    def steps(self, session, namespace: str, engine) -> dict:
        from kvtier.connectors._pipeline import BlockToSave, save_blocks  # noqa: PLC0415
        from kvtier.proto.v1 import kvtier_pb2 as pb  # noqa: PLC0415
        torch, args = self.torch, self.args
        H, F, T = args.hidden, args.ffn, args.step_tokens
        nb, KV = T // BLOCK_TOKENS, KV_HEADS * HEAD_SIZE
        g = self.gen
        dt = torch.bfloat16
        w_qkv = torch.randn(H, H + 2 * KV, dtype=dt, device=self.device, generator=g) * H ** -0.5
        w_o = torch.randn(H, H, dtype=dt, device=self.device, generator=g) * H ** -0.5
        w_gu = torch.randn(H, 2 * F, dtype=dt, device=self.device, generator=g) * H ** -0.5
        w_d = torch.randn(F, H, dtype=dt, device=self.device, generator=g) * F ** -0.5
        x0 = torch.randn(T, H, dtype=dt, device=self.device, generator=g)
        caches = list(self.kv.values())
        flops = 2 * T * len(caches) * (H * (H + 2 * KV) + H * H + H * 2 * F + F * H)
        ring_base, ring = 2 * args.blocks, args.ring_blocks
        segments = ring // nb
        owner: dict[int, str] = {}                # ring segment -> the request whose save may still read it
        counts = {"stored": 0, "save_errors": 0, "submitted": 0, "dropped": 0, "held_waits": 0, "blocks": 0}
        lock = threading.Lock()

        def forward(ids_t):
            x = x0
            for kv in caches:
                qkv = x @ w_qkv
                kv[0].index_copy_(0, ids_t, qkv[:, H:H + KV].reshape(nb, BLOCK_TOKENS, KV_HEADS, HEAD_SIZE))
                kv[1].index_copy_(0, ids_t, qkv[:, H + KV:].reshape(nb, BLOCK_TOKENS, KV_HEADS, HEAD_SIZE))
                x = x + qkv[:, :H] @ w_o
                gu = x @ w_gu
                x = x + (torch.nn.functional.silu(gu[:, :F]) * gu[:, F:]) @ w_d
            return x

        def save_run(job, ids, keys, after):
            blocks = [BlockToSave(k, keys[i - 1] if i else b"", self.block_bytes) for i, k in enumerate(keys)]

            def fill(arena, slots):
                views = self.views(arena)
                job.start_copy()
                try:
                    self.copies.run(after, lambda: views.pack(ids, slots))
                finally:
                    job.end_copy()
            try:
                statuses = save_blocks(session, namespace, blocks, fill, allocate_wait_ms=200)
            except Exception:
                with lock:
                    counts["save_errors"] += len(blocks)
                raise
            with lock:
                counts["stored"] += sum(1 for s in statuses if s == pb.STORED)
                counts["save_errors"] += sum(1 for s in statuses if s != pb.STORED)

        step_no = [0]

        def one_step(mode: str) -> float:
            s = step_no[0]
            step_no[0] += 1
            seg = s % segments
            req = owner.get(seg)
            if req is not None and engine.holding(req):  # never overwrite blocks a save still reads
                counts["held_waits"] += 1
                while engine.holding(req):
                    time.sleep(0.0005)
            ids = list(range(ring_base + seg * nb, ring_base + (seg + 1) * nb))
            ids_t = torch.tensor(ids, device=self.device)
            t0 = time.perf_counter()
            forward(ids_t)
            if mode == "async":
                after = self.copies.mark()
                req_id = f"step-{s}"
                keys = [key_of(self.run_id, "step", s, i) for i in range(nb)]
                ok = engine.submit_save(req_id, nb * self.block_bytes,
                                        lambda job, ids=ids, keys=keys, after=after: save_run(job, ids, keys, after))
                counts["submitted"] += 1
                counts["blocks"] += nb
                if ok:
                    owner[seg] = req_id
                else:
                    counts["dropped"] += 1
            self.stream_sync()
            return time.perf_counter() - t0

        times: dict[str, list[float]] = {"none": [], "async": []}
        walls = {"none": 0.0, "async": 0.0}
        for mode in ("none", "async"):  # warm-up
            for _ in range(3):
                one_step(mode)
        engine.wait_idle(30.0)
        counts.update({k: 0 for k in counts})
        phase_end = time.monotonic() + args.phase_seconds
        for rep in range(args.reps):
            for mode in ("none", "async"):
                if rep and time.monotonic() > phase_end:
                    break
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    times[mode].append(one_step(mode))
                walls[mode] += time.perf_counter() - t0
                t0 = time.perf_counter()
                if not engine.wait_idle(max(1.0, min(60.0, self.dog.left() - 30))):
                    log("steps: the saves did not finish in time")
                if mode == "async":
                    log(f"steps rep {rep}: no connector {1e3 * median(times['none']):.2f} ms, async saves "
                        f"{1e3 * median(times['async']):.2f} ms per step (medians so far); saves drained "
                        f"{time.perf_counter() - t0:.2f} s after the last step")
        return {"times": times, "walls": walls, "counts": counts, "flops": flops, "new_blocks": nb,
                "step_bytes": nb * self.block_bytes, "engine_stats": dict(engine.stats)}


def run_bench(args, dog: Watchdog) -> int:
    import torch  # noqa: PLC0415

    import kvtier.daemon  # noqa: PLC0415
    from kvtier.connectors._transfers import TransferEngine  # noqa: PLC0415
    from _common import Row, human_bytes, write_results  # noqa: PLC0415
    from _daemon import BenchDaemon  # noqa: PLC0415

    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    import grpc  # noqa: PLC0415
    import xxhash  # noqa: PLC0415
    log(f"kvtier from {Path(kvtier.daemon.__file__).parent.parent}; grpcio {grpc.__version__} and xxhash "
        f"{xxhash.VERSION} from {Path(grpc.__file__).parent.parent}, {Path(xxhash.__file__).parent.parent}; "
        f"torch {torch.__version__} from {Path(torch.__file__).parent}; device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else " (CPU smoke test)"))
    dog.phase = "setup"
    bench = Bench(args, torch, device, dog)
    slot = bench.block_bytes
    # Room for a round and its successor, and for every block the step phase saves (nothing is evicted
    # in the middle of a measurement), plus headroom.
    step_blocks = 0 if args.skip_steps else (3 + args.reps * args.steps) * (args.step_tokens // BLOCK_TOKENS)
    capacity = args.arena or (max(2 * args.blocks, args.blocks + step_blocks) * slot
                              + (512 * MIB if bench.cuda else 64 * slot))
    if isinstance(capacity, str):
        from _common import parse_size  # noqa: PLC0415
        capacity = parse_size(capacity)
    capacity = (capacity // slot) * slot
    work_owned = args.work_dir is None
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kvtier-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if work_owned:
        dog.work_dir = work
    namespace = "bench-gpu-connector"
    log(f"KV cache: {args.layers} layers x (2, {bench.num_blocks}, 16, 8, 128) bf16 = "
        f"{human_bytes(bench.num_blocks * slot)}; block {human_bytes(slot)}; arena {human_bytes(capacity)}; "
        f"disk {'off' if args.no_disk else args.disk_capacity + ' under ' + str(work)}")
    results: dict = {}
    engine = None
    failures = [0]

    def job_failed(kind, error):  # the first few are logged, all are counted (engine.stats)
        failures[0] += 1
        if failures[0] <= 3:
            log(f"{kind} job failed: {error!r}" + ("; further failures are only counted" if failures[0] == 3 else ""))
    try:
        dog.phase = "kvtierd start"
        t0 = time.perf_counter()
        with BenchDaemon(work, daemon_overrides(args, slot, capacity)) as daemon:
            dog.daemon = daemon
            start_s = time.perf_counter() - t0
            session = make_session_class()(daemon.socket, 60.0, {namespace: {"model": "llama-8b-shaped",
                                                                              "bench": NAME}})
            try:
                session.ensure_namespaces()
                t0 = time.perf_counter()
                arena = session.arena()
                bench.views(arena)
                map_s = time.perf_counter() - t0
                pinned = bool(arena.pinned)
                log(f"kvtierd serving after {start_s:.1f} s; arena mapped in {map_s:.1f} s: {arena.slot_count} slots "
                    f"of {human_bytes(arena.slot_bytes)}, {'PINNED (cudaHostRegister)' if pinned else 'not pinned'}")
                if bench.cuda and not pinned:
                    log("WARNING: the arena is not pinned in this process: copies to and from it are pageable")
                engine = TransferEngine(max_inflight_bytes=max(1 << 30, args.blocks * slot),
                                        on_error=job_failed)
                dog.phase = "bandwidth"
                results["bw"] = bench.bandwidth(session, namespace, engine)
                engine.close()
                engine = None
                if not args.skip_steps and not results["bw"]["errors"]:
                    dog.phase = "steps"
                    engine = TransferEngine(max_inflight_bytes=args.max_inflight,
                                            on_error=job_failed)
                    results["steps"] = bench.steps(session, namespace, engine)
                    engine.close()
                    engine = None
                bench._views = bench._views_of = None
            finally:
                if engine is not None:
                    engine.close(5.0)
                session.close()
            dog.phase = "kvtierd stop"
            # Killed, not stopped: a graceful stop drains the disk write-through backlog (up to a
            # minute), and its data is thrown away with the temp dir.
            daemon.kill()
            dog.daemon = None
    finally:
        if work_owned:
            shutil.rmtree(work, ignore_errors=True)
    dog.phase = "report"
    return report(args, bench, results, pinned, start_s, Row, human_bytes, write_results)


def report(args, bench, results, pinned, start_s, Row, human_bytes, write_results) -> int:
    torch = bench.torch
    bw = results["bw"]
    timed = [r for r in bw["rounds"] if r["timed"]] or bw["rounds"]
    n = bw["nbytes"]
    med = {k: median([r[k] for r in timed]) for k in timed[0] if k.endswith(" s")} if timed else {}
    cuda = bench.cuda
    limit_word = "pinned cudaMemcpy" if cuda else "CPU memcpy (smoke)"
    rows = []
    if med:
        rows += [
            Row("save through kvtierd (D2H)", gib_s(n, med["save s"]), "GiB/s", gib_s(n, med["D2H s"]),
                f"{limit_word} D2H, same bytes", goal=0.8, headline=True,
                notes=f"{args.blocks} x {human_bytes(bench.block_bytes)}, one TransferEngine job"),
            Row("load through kvtierd (H2D)", gib_s(n, med["load s"]), "GiB/s", gib_s(n, med["H2D s"]),
                f"{limit_word} H2D, same bytes", goal=0.8, headline=True),
            Row(f"{limit_word} D2H (the save's limit)", gib_s(n, med["D2H s"]), "GiB/s", gib_s(n, med["one D2H s"]),
                "one copy of the whole round", notes=f"{len(bench.layout.parts)} copies of "
                f"{human_bytes(args.blocks * bench.layout.parts[0].nbytes)}"),
            Row(f"{limit_word} H2D (the load's limit)", gib_s(n, med["H2D s"]), "GiB/s", gib_s(n, med["one H2D s"]),
                "one copy of the whole round"),
            Row("save: ArenaViews.pack only (gather + D2H into the arena)", gib_s(n, med["pack s"]), "GiB/s",
                gib_s(n, med["D2H s"]), f"{limit_word} D2H", notes="part of the save above"),
            Row("load: ArenaViews.unpack only (H2D from the arena + scatter)", gib_s(n, med["unpack s"]), "GiB/s",
                gib_s(n, med["H2D s"]), f"{limit_word} H2D", notes="part of the load above"),
            Row("xxh3_64 of the same bytes, one thread (the client's checksum)", gib_s(n, med["xxh3 s"]), "GiB/s",
                gib_s(n, med["D2H s"]), f"{limit_word} D2H",
                notes="a save hashes every block here and kvtierd hashes it again in Commit; a load hashes it once"),
        ]
    rows.append(Row("blocks verified byte for byte after save + load", bw["verified"], "blocks",
                    goal=max(1, bw["checked"]), goal_on="value",
                    notes=f"{len(bw['rounds'])} rounds incl. warm-up; a mismatch fails the bench"))
    steps = results.get("steps")
    details = {"Per round": [{k: (round(v * 1e3, 2) if k.endswith(" s") else v) for k, v in r.items()}
                             for r in bw["rounds"]]}
    details["Per round"] = [{(k[:-2] + " ms" if k.endswith(" s") else k): v for k, v in r.items()}
                            for r in details["Per round"]]
    notes = []
    if steps:
        t_none, t_async = median(steps["times"]["none"]), median(steps["times"]["async"])
        mean_none = sum(steps["times"]["none"]) / len(steps["times"]["none"])
        mean_async = sum(steps["times"]["async"]) / len(steps["times"]["async"])
        c = steps["counts"]
        stored_bytes = c["stored"] * bench.block_bytes
        rows.append(Row("engine steps/s with async saves", 1 / t_async, "steps/s", 1 / t_none, "no connector",
                        headline=True, notes=f"median step {t_async * 1e3:.2f} ms vs {t_none * 1e3:.2f} ms "
                        f"(means {mean_async * 1e3:.2f} vs {mean_none * 1e3:.2f} ms)"))
        rows.append(Row("blocks stored by the async saves during the steps", c["stored"], "blocks",
                        limit=c["blocks"] or None, limit_name="blocks handed to submit_save",
                        notes=f"{c['dropped']} of {c['submitted']} jobs dropped at the in-flight bound, "
                        f"{c['save_errors']} blocks failed"))
        details["Engine steps"] = [
            {"mode": m, "steps": len(steps["times"][m]), "median ms": median(steps["times"][m]) * 1e3,
             "mean ms": sum(steps["times"][m]) / len(steps["times"][m]) * 1e3,
             "max ms": max(steps["times"][m]) * 1e3,
             "TFLOP/s": steps["flops"] / median(steps["times"][m]) / 1e12} for m in ("none", "async")]
        notes.append(
            f"Steps: {args.step_tokens} tokens per step through {args.layers} Llama-8B-shaped layers (hidden "
            f"{args.hidden}, MLP {args.ffn}, {steps['flops'] / 1e12:.2f} TFLOP per step), each writing its K/V "
            f"into {steps['new_blocks']} new blocks ({human_bytes(steps['step_bytes'])} to save per step); a step "
            "ends with the engine stream's synchronize (not the device's: the copy stream runs on). "
            f"{args.reps} x {args.steps} steps per mode, alternating. Async saves stored "
            f"{human_bytes(stored_bytes)} in {steps['walls']['async']:.2f} s of steps "
            f"({gib_s(stored_bytes, steps['walls']['async']) if steps['walls']['async'] else 0:.2f} GiB/s); "
            f"TransferEngine stats {steps['engine_stats']}.")
    props = f"{torch.cuda.get_device_name(bench.device)}" if cuda else "CPU (smoke test: not a result)"
    notes.insert(0, (f"Device {props}; torch {torch.__version__}; Python {sys.version.split()[0]}. "
                     f"Medians of {len(timed)} timed rounds after {args.warmup} warm-up; a round is "
                     f"{args.blocks} blocks of {human_bytes(bench.block_bytes)} ({human_bytes(n)}) each way. "
                     f"kvtierd: arena {'pinned' if pinned else 'NOT pinned'} in the bench process, "
                     f"disk tier {'off' if args.no_disk else 'on (temp dir)'}, started in {start_s:.1f} s."))
    notes.append("Save = Allocate + pack on the CopyStream + xxh3 of every block in this process + Commit "
                 "(the daemon re-hashes every block); load = Acquire + xxh3 verify + unpack + Release. The "
                 "per-round table splits out the copies (pack/unpack) and the RPCs; the rest is the "
                 "client-side xxh3 and Python.")
    for e in bw["errors"]:
        notes.append(f"FAILED: {e}")
    info = Path(args.wheels) / "BUILD-INFO.txt"
    params = {"device": str(bench.device), "kv cache": "per layer (2, blocks, 16, 8, 128) bf16", "layers": args.layers, "blocks": args.blocks,
              "block": human_bytes(bench.block_bytes), "rounds": args.rounds, "warmup": args.warmup,
              "arena pinned": pinned, "disk": not args.no_disk, "step_tokens": args.step_tokens,
              "steps": args.steps, "reps": args.reps}
    if os.environ.get(ENV_VENV) and info.exists():
        params["wheelhouse"] = " ".join(info.read_text().split("\n")[:2])
    data = write_results(NAME, TITLE, rows, params, args.out, details, notes, plot=not args.no_plot)
    print(json.dumps({"bench": NAME, "ok": not bw["errors"], "verified_blocks": bw["verified"],
                      "rows": {r.name: {"value": r.value, "ratio": r.ratio} for r in rows}}, default=str), flush=True)
    del data
    if bw["errors"] or bw["verified"] != bw["checked"] or not bw["checked"]:
        log("FAILED: " + "; ".join(bw["errors"] or ["no block was verified"]))
        return 1
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault(ENV_T0, repr(time.time()))
    parser, args = parse_args(argv)
    if sys.version_info < (3, 11):
        log(f"kvtier needs Python >= 3.11 (tomllib, asyncio.timeout, dataclass(weakref_slot)); {sys.executable} "
            f"is {sys.version.split()[0]}: run this bench with a Python 3.11+ that has torch")
        return 2
    in_venv = bool(os.environ.get(ENV_VENV))
    force = (args.self_install or os.environ.get(ENV_FORCE) == "1") and not in_venv

    if not args.wheelhouse_check:
        try:
            import torch  # noqa: PLC0415 - the machine's own
        except ImportError as error:
            log(f"this bench needs torch (with CUDA for the real run); {sys.executable} has none: {error}")
            return 2
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            print(f"bench_gpu_connector: NO CUDA DEVICE (torch {torch.__version__}, cuda "
                  f"{torch.version.cuda}, is_available() is False). This bench needs a GPU; "
                  "`--device cpu` runs a small smoke test instead.", file=sys.stderr, flush=True)
            return 2
        defaults = GPU_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS
        for name, value in defaults.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        if args.step_tokens % BLOCK_TOKENS or args.ring_blocks % (args.step_tokens // BLOCK_TOKENS):
            parser.error("--step-tokens must be a multiple of 16 and --ring-blocks a multiple of step-tokens/16")
        if min(args.blocks, args.layers, args.rounds, args.steps, args.reps) < 1 or args.warmup < 0:
            parser.error("sizes and counts must be at least 1")

    ok, why = kvtier_importable()
    if force or not ok:
        if in_venv:
            log(f"kvtier is still not importable in the wheelhouse venv: {why}")
            return 2
        return self_install(args, argv, why or f"{ENV_FORCE}=1 / --self-install")

    dog = Watchdog(args.time_limit)
    if dog.left() < 30:
        log(f"only {dog.left():.0f} s left of the time limit after the install: not starting")
        return 124
    if args.wheelhouse_check:
        return wheelhouse_check(args)
    return run_bench(args, dog)


if __name__ == "__main__":
    sys.exit(main())
