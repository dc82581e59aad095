"""The export agent: the NIXL agent whose metadata peers get, in a process of its own.

NIXL checks remote ranges only in the initiator's process, and UCX's TCP and cma transports carry no
memory key: a peer that rewrites the region in the metadata it was given READs and WRITEs any address
of the process that created the agent (tests/tiers/test_nixl.py measures it). So the agent a kvtierd
hands out is not created in kvtierd. ExportAgent starts `python -m kvtier.tiers.nixl_export`, a fresh
interpreter (fork + exec, close_fds) that receives only two descriptors, the export window's memfd
and one end of a control socketpair. It maps the window (nothing else of kvtierd: no arena, no
cluster key, no config, no other tenant's data; its environment is cut to what Python, NIXL and UCX
read), sets PR_SET_NO_NEW_PRIVS, creates the NIXL agent over the window, sends its metadata back on
the control socket and then only keeps that agent alive (NIXL's progress thread serves TCP READs)
until the control socket closes. kvtierd maps the same memfd and copies served blocks into it (Pin),
so a crafting peer reaches the window and the agent's own memory, not kvtierd's.

Lifecycle: ExportAgent() returns once the agent sent its metadata (bounded by start_timeout_s, else
ExportAgentError with the reason and the agent's exit status); watch() ends when the agent dies
(kvtierd supervises it as a background task: a dead agent stops the daemon); stop() shuts the
control socket down (the agent closes its NIXL agent and exits), waits, and kills it if it does not go.
The agent also dies with kvtierd (PR_SET_PDEATHSIG) and ignores SIGINT, SIGTERM and SIGHUP (a
Ctrl-C or systemd's stop signal reaches the whole process group or cgroup; kvtierd stops the agent
itself, after the peer API). Its stdout and stderr are kvtierd's stderr, i.e. the daemon's log.

Once the NIXL agent is up the agent sandboxes itself (_landlock, _no_unix_sockets): a peer that can
WRITE the agent's memory may get code to run in it, with kvtierd's uid, so from then on it may open
no file (kvtierd's key files and data dir), create no Unix socket (kvtierd's session socket would
take that uid for an administrator) and signal no process outside it.

The window's memory in the agent is the only thing NIXL's registration names; a crafting peer still
reaches the rest of the agent's address space (the interpreter and the NIXL/UCX libraries: nothing
of kvtierd's), and by READing or WRITEing an address the agent has not mapped it can crash it (over
TCP the agent's progress thread does the copy), which stops kvtierd: docs/peers.md.
"""

from __future__ import annotations

import base64
import ctypes
import json
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time

START_TIMEOUT_S = 60.0   # fresh interpreter + NIXL import + UCX start; a loaded 2-core machine needs ~5 s
STOP_TIMEOUT_S = 10.0
_MAX_MESSAGE = 1 << 20
_FRAME = struct.Struct("<I")
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

# What the agent's environment keeps of kvtierd's: the interpreter's and the NIXL/UCX settings. Not
# the rest (e.g. AWS_* credentials, which kvtierd's S3 client may read from its environment).
_ENV_KEEP = {"PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "LANG", "LC_ALL", "LC_CTYPE",
             "TMPDIR", "CUDA_VISIBLE_DEVICES"}
_ENV_PREFIXES = ("UCX_", "NIXL_")


class ExportAgentError(RuntimeError):
    """The export agent did not start, or answered something else than its metadata."""


def agent_env(environ=os.environ) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k in _ENV_KEEP or k.startswith(_ENV_PREFIXES)}


class ExportAgent:
    """kvtierd's side of the export agent serving `window` (a tiers.nixl.ExportWindow created with
    share=True: its memfd is handed to the agent). Attributes once started: pid, metadata (what
    Hello hands peers: our envelope, see tiers.nixl.encode_metadata), address (where the window
    lies in the agent's address space: the addresses peers READ; not the window's address here)."""

    def __init__(self, name: str, window, start_timeout_s: float = START_TIMEOUT_S):
        self.name, self.size = name, window.size_bytes
        self.stopping = False
        self._watched = False  # watch() runs: it closes the control socket
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._control = ours
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "kvtier.tiers.nixl_export", name, str(window.size_bytes),
                 str(window.fd), str(theirs.fileno()), str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=_log_fd(), close_fds=True,
                pass_fds=(window.fd, theirs.fileno()), env=agent_env(), cwd="/")
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.pid = self.proc.pid
        try:
            hello = self._hello(start_timeout_s)
            self.metadata, self.address = base64.b64decode(hello["metadata"]), int(hello["address"])
            self.sandbox = str(hello.get("sandbox", ""))
            self._check(self.metadata)
        except BaseException:
            self.stop()
            raise
        ours.setblocking(False)

    def _hello(self, timeout_s: float) -> dict:
        deadline, data = time.monotonic() + timeout_s, b""
        while len(data) < _FRAME.size or len(data) < _FRAME.size + _FRAME.unpack_from(data)[0]:
            left = deadline - time.monotonic()
            ready = select.select([self._control], [], [], max(0.0, left))[0] if left > 0 else []
            if not ready:
                raise ExportAgentError(f"the NIXL export agent (pid {self.pid}) sent no metadata within "
                                       f"{timeout_s:g} s{self._status()}")
            chunk = self._control.recv(1 << 16)
            if not chunk:
                raise ExportAgentError(f"the NIXL export agent (pid {self.pid}) exited before it sent its "
                                       f"metadata{self._status(wait_s=5)}; its errors are above in this log")
            data += chunk
            if len(data) > _MAX_MESSAGE + _FRAME.size:
                raise ExportAgentError("the NIXL export agent sent an oversized start message")
        try:
            return json.loads(data[_FRAME.size:_FRAME.size + _FRAME.unpack_from(data)[0]])
        except ValueError as exc:
            raise ExportAgentError(f"the NIXL export agent sent a malformed start message: {exc}") from exc

    def _check(self, metadata: bytes) -> None:
        from .nixl import decode_metadata  # noqa: PLC0415
        name, regions, _ = decode_metadata(metadata)
        if name != self.name or regions != ((self.address, self.size),):
            raise ExportAgentError(f"the NIXL export agent registered {regions} as {name!r}, "
                                   f"expected ({self.address:#x}, {self.size}) as {self.name!r}")

    def _status(self, wait_s: float = 0.0) -> str:
        try:
            code = self.proc.wait(wait_s) if wait_s else self.proc.poll()
        except subprocess.TimeoutExpired:
            code = None
        return "" if code is None else f" ({describe_exit(code)})"

    async def watch(self) -> str:
        """Returns when the agent is gone (its end of the control socket closed): how it ended."""
        import asyncio  # noqa: PLC0415 - the agent process itself never needs asyncio
        loop = asyncio.get_running_loop()
        self._watched = True
        try:
            while await loop.sock_recv(self._control, 4096):
                pass  # the agent sends nothing after its metadata; b"": it is gone, or stop() shut down
        finally:
            self._control.close()  # here, not in stop(): the loop is done with the descriptor
        code = await asyncio.to_thread(self._wait, STOP_TIMEOUT_S)
        return describe_exit(code) if code is not None else "closed its control socket but still runs"

    def _wait(self, timeout_s: float) -> int | None:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> int:
        """Idempotent: closes the control socket (the agent's signal to close NIXL and exit), waits
        STOP_TIMEOUT_S, then kills it. Its exit status."""
        self.stopping = True
        if self._control.fileno() >= 0:
            try:  # EOF for the agent, and for watch() (closing the descriptor under the loop would not wake it)
                self._control.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            if not self._watched:
                self._control.close()
        if self._wait(STOP_TIMEOUT_S) is None:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode


def _log_fd() -> int | None:
    """kvtierd's stderr (its log), where the agent's stdout goes too; None: inherit stdout."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # a replaced sys.stderr (pytest's capture)
        return None


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


# --- the agent process -------------------------------------------------------------------------------

def _prctl(option: int, arg: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_RESTRICT_SELF = 444, 446
_LANDLOCK_FS_BITS = {1: 13, 2: 14, 3: 15, 4: 15, 5: 16}   # ABI -> handled filesystem access bits
_LANDLOCK_SCOPES = 0x3          # ABI 6: abstract Unix sockets and signals outside the domain
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
_AUDIT_ARCH_X86_64, _NR_SOCKET, _AF_UNIX, _EACCES = 0xC000003E, 41, 1, 13


def _landlock() -> str:
    """No filesystem access at all from now on (no open, no exec, no socket file), and with ABI 6
    no signal to and no abstract socket of a process outside the agent: what code a peer may run
    in the agent by WRITEing its memory cannot read kvtierd's key files or data dir."""
    libc = ctypes.CDLL(None, use_errno=True)
    abi = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return f"no Landlock (errno {ctypes.get_errno()})"
    attr = (ctypes.c_uint64 * 3)((1 << _LANDLOCK_FS_BITS.get(abi, 16)) - 1, 0, _LANDLOCK_SCOPES if abi >= 6 else 0)
    size = 24 if abi >= 6 else 8
    ruleset = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return f"Landlock refused the ruleset (errno {ctypes.get_errno()})"
    try:
        if libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            return f"Landlock refused to restrict (errno {ctypes.get_errno()})"
    finally:
        os.close(ruleset)
    return f"Landlock ABI {abi}: no filesystem access" + (", no signals or abstract sockets outside" if abi >= 6
                                                           else "")


_NR_IO_URING = (425, 426, 427)  # io_uring_setup, _enter, _register: their socket ops bypass seccomp
_X32_BIT = 0x40000000
_RET_ALLOW, _RET_KILL = 0x7FFF0000, 0x80000000


def _no_unix_sockets() -> str:
    """seccomp: socket(AF_UNIX, ...) fails with EACCES, so the agent cannot open a session with
    kvtierd (whose uid it has) on its socket; io_uring (whose socket and connect operations seccomp
    never sees) fails with EACCES; any other syscall ABI (i386 int 0x80, x32 numbers) kills the
    agent, since the numbers checked here are x86_64's. x86_64 only."""
    if os.uname().machine != "x86_64":
        return "no seccomp filter (not x86_64)"
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    eacces = 0x00050000 | _EACCES
    program = [(ld, 0, 0, 4), (jeq, 0, 10, _AUDIT_ARCH_X86_64),          # 0-1: another ABI -> kill
               (ld, 0, 0, 0), (jge, 8, 0, _X32_BIT),                      # 2-3: x32 -> kill
               (jeq, 6, 0, _NR_IO_URING[0]), (jeq, 5, 0, _NR_IO_URING[1]),  # 4-6: io_uring -> EACCES
               (jeq, 4, 0, _NR_IO_URING[2]),
               (jeq, 0, 2, _NR_SOCKET), (ld, 0, 0, 16), (jeq, 1, 0, _AF_UNIX),  # 7-9: socket(AF_UNIX)
               (ret, 0, 0, _RET_ALLOW), (ret, 0, 0, eacces), (ret, 0, 0, _RET_KILL)]  # 10-12
    raw = b"".join(struct.pack("<HBBI", *op) for op in program)
    buffer = ctypes.create_string_buffer(raw, len(raw))
    fprog = struct.pack("<HxxxxxxQ", len(program), ctypes.addressof(buffer))
    fprog_buffer = ctypes.create_string_buffer(fprog, len(fprog))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_SECCOMP, ctypes.c_ulong(_SECCOMP_MODE_FILTER), fprog_buffer, 0, 0) != 0:
        return f"no seccomp filter (errno {ctypes.get_errno()})"
    return "seccomp: no new Unix sockets, no io_uring, x86_64 syscalls only"


def _send(control: socket.socket, message: dict) -> None:
    body = json.dumps(message).encode()
    control.sendall(_FRAME.pack(len(body)) + body)


def main(argv: list[str]) -> int:
    name, size, memory_fd, control_fd, parent = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4])
    # kvtierd decides when the agent ends: a Ctrl-C or systemd's SIGTERM to the whole group must not
    # end it before kvtierd has drained (it would read as a dead agent: FATAL).
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # kvtierd died before the line above: nothing to serve
        return 1
    control = socket.socket(fileno=control_fd)
    memory = mmap.mmap(memory_fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE, mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(memory_fd)
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    from kvtier.tiers.nixl import NixlTransport  # noqa: PLC0415 - after the prctls
    transport = NixlTransport(name, [(address, size)])
    sandbox = [_landlock(), _no_unix_sockets()]  # after start-up: NIXL and Python have loaded what they need
    _send(control, {"metadata": base64.b64encode(transport.local_metadata()).decode(), "address": address,
                    "pid": os.getpid(), "sandbox": "; ".join(sandbox)})
    while control.recv(4096):  # serve until kvtierd closes the control socket (or dies)
        pass
    transport.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
