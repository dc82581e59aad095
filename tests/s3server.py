"""Real S3 endpoints for tests and benchmarks: moto's server (S3Server) and s3rver (S3rverServer), each
a subprocess on 127.0.0.1.

Usage from a test module (tests/ is on sys.path through tests/conftest.py):

    from s3server import make_bucket, s3_server  # noqa: F401  (importing the fixture registers it)

    def test_something(s3_server):
        make_bucket(s3_server, "my-bucket")
        client = s3_server.client()          # a raw boto3 client for the same endpoint

The `s3_server` fixture is function-scoped in effect: one moto process serves every test of a pytest
process, its state is reset (POST /moto-api/reset) before each test, and whatever a test did to it
(pause, stop) is undone at teardown. Outside pytest (benchmarks): `with S3Server() as server: ...`.

Outage simulation, two ways:
- `pause()` / `resume()`: SIGSTOP / SIGCONT. The kernel still accepts TCP connections (listen
  backlog) but nothing answers, so clients hit their connect/read timeouts: an unreachable, hung
  server. **State is kept**: buckets and objects are there after resume(), and requests sent while
  paused sit in the kernel's queues and are served on resume (a PUT that timed out may still land).
- `stop()` / `start()`: the process exits and a new one starts on the same port. **moto keeps
  everything in memory, so every bucket and object is lost**: a test that needs state across such an
  outage must re-create its bucket (make_bucket) and account for the missing objects.

The server process gets PR_SET_PDEATHSIG (Linux): it is sent SIGTERM when the thread that started it
exits, even if the test process is killed before its fixtures tear down.

`S3rverServer` runs s3rver (npm, pinned in tests/node/package.json, installed by `make test`), a
second, independent S3 implementation with other gaps than moto's: it ignores `If-None-Match` on PUT
(overwrites), ignores `If-Match` on DELETE, checks the access key id (only "S3RVER") but not SigV4
signatures, and keeps its state in a directory, so stop()/start() loses nothing. Same interface as
S3Server minus reset(); the `s3rver_server` fixture starts one per test and fails the test
when node or s3rver is not installed.

`CuttingProxy` sits in front of a server and breaks the first N responses mid-body (short reads).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest

# Dummy credentials: moto accepts any; boto3 refuses to sign without some.
DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "kvtier-test-key-id",
    "AWS_SECRET_ACCESS_KEY": "kvtier-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",   # never probe the instance metadata service
}
_UNSET_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_CONFIG_FILE",
              "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# SIGTERM the server when the thread that started it exits. setpriv sets it between fork and exec,
# not a preexec_fn: a preexec_fn makes Python fork() instead of vfork(), and gRPC's fork handlers,
# armed by whatever channels earlier tests left in this process, then abort the child (SIGABRT,
# "epoll_wait error: Bad file descriptor") before the server ever runs.
_DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "TERM"] if shutil.which("setpriv") else []


class _ServerProcess:
    """An S3 server subprocess on host:port: start/stop/pause, readiness by HTTP answer, boto3 clients.
    Subclasses name the command (_command) and the credentials the server accepts."""

    NAME = "server"
    ACCESS_KEY_ID = DUMMY_ENV["AWS_ACCESS_KEY_ID"]
    SECRET_ACCESS_KEY = DUMMY_ENV["AWS_SECRET_ACCESS_KEY"]

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, log_path: str | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path or os.path.join(tempfile.gettempdir(),
                                                 f"{self.NAME}-{os.getpid()}-{self.port}.log")
        self.proc: subprocess.Popen | None = None
        self.paused = False
        self._admin = None  # make_bucket's client (boto3 clients are thread-safe)

    def _command(self) -> list[str]:
        raise NotImplementedError

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0):
        """Starts the server (again, on the same port) and waits until it answers HTTP."""
        if self.running:
            return self
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                _DIE_WITH_PARENT + self._command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.paused = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.NAME} exited with {self.proc.returncode}:\n{self.log()}")
            if self.answers(timeout=0.5):
                return self
            time.sleep(0.05)  # polling the port is the only readiness signal both servers give
        self.stop()
        raise TimeoutError(f"{self.NAME} did not answer on {self.endpoint_url} in {timeout}s:\n{self.log()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def answers(self, timeout: float = 1.0) -> bool:
        """True if an unauthenticated GET / gets any HTTP answer in time."""
        try:
            with urllib.request.urlopen(self.endpoint_url + "/", timeout=timeout) as reply:
                reply.read()
            return True
        except urllib.error.HTTPError:
            return True   # an HTTP error is still an answer
        except (OSError, ValueError):
            return False

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but never answered. State is kept."""
        assert self.running, "server is not running"
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT after pause()."""
        if self.running and self.paused:
            self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self, timeout: float = 10.0) -> None:
        """Stops the process (moto loses every bucket and object; s3rver keeps them on disk)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if self.paused:
                self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.paused = False

    def restart(self, timeout: float = 30.0):
        """stop() + start() on the same port (moto: every bucket and object is gone afterwards)."""
        self.stop()
        return self.start(timeout)

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as file:
                return file.read()[-20000:]
        except OSError:
            return ""

    def client(self, **kwargs):
        """A plain boto3 S3 client for this endpoint (its own session: sessions are not thread-safe)."""
        import boto3
        kwargs.setdefault("region_name", "us-east-1")
        kwargs.setdefault("aws_access_key_id", self.ACCESS_KEY_ID)
        kwargs.setdefault("aws_secret_access_key", self.SECRET_ACCESS_KEY)
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, **kwargs)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        try:
            os.unlink(self.log_path)
        except OSError:
            pass


class S3Server(_ServerProcess):
    """One `python -m moto.server` subprocess. See the module docstring for outage semantics.
    Accepts any credentials."""

    NAME = "moto"

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]

    def reset(self) -> None:
        """Drops every bucket and object (moto's POST /moto-api/reset); the process keeps running."""
        request = urllib.request.Request(self.endpoint_url + "/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(request, timeout=10) as reply:
            reply.read()


S3RVER_JS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node", "node_modules", "s3rver", "bin",
                         "s3rver.js")


class S3rverServer(_ServerProcess):
    """One `node s3rver.js` subprocess storing under `directory` (a fresh temporary one by default,
    removed by __exit__/cleanup()). Accepts access key id "S3RVER" only; does not verify SigV4
    signatures; ignores If-None-Match on PUT and If-Match on DELETE."""

    NAME = "s3rver"
    ACCESS_KEY_ID = "S3RVER"       # s3rver's one built-in account
    SECRET_ACCESS_KEY = "S3RVER"

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, log_path: str | None = None,
                 directory: str | None = None):
        super().__init__(host, port, log_path)
        self._own_directory = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="s3rver-")

    @staticmethod
    def missing() -> str | None:
        """Why s3rver cannot run here (node or the npm package missing), or None."""
        if shutil.which("node") is None:
            return "node is not installed"
        if not os.path.exists(S3RVER_JS):
            return "s3rver is not installed (make .venv/.installed-engines, or npm ci in tests/node)"
        return None

    def _command(self) -> list[str]:
        return [shutil.which("node"), S3RVER_JS, "--directory", self.directory, "--port", str(self.port),
                "--address", self.host, "--silent"]

    def cleanup(self) -> None:
        """Removes the data directory if this object created it."""
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self.cleanup()


def make_bucket(server: _ServerProcess, name: str) -> str:
    """Creates bucket `name` (a valid S3 bucket name: 3-63 chars, lowercase, digits, '-') if missing."""
    if server._admin is None:
        server._admin = server.client()   # cached: creating a boto3 client costs ~0.1-0.2 s
    errors = server._admin.exceptions
    try:
        server._admin.create_bucket(Bucket=name)
    except (errors.BucketAlreadyOwnedByYou, errors.BucketAlreadyExists):  # s3rver answers the latter
        pass
    return name


_SHARED: S3Server | None = None


def shared_server() -> S3Server:
    """The one server of this test process, started on first use, stopped at exit (or with its starter)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = S3Server()
        atexit.register(_SHARED.__exit__)
    if not _SHARED.running:
        _SHARED.start()
    return _SHARED


@pytest.fixture
def s3_server(monkeypatch):
    """A running moto server with no buckets, and dummy AWS credentials in the environment for boto3.

    Function scope as far as tests can tell: the process is shared by the tests of one pytest process
    (starting moto costs seconds), but its state is reset before every test, and a test may pause,
    stop or restart it; teardown brings it back running and unpaused.
    """
    for name in _UNSET_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in DUMMY_ENV.items():
        monkeypatch.setenv(name, value)
    server = shared_server()
    server.reset()
    try:
        yield server
    finally:
        server.resume()
        if not server.running:
            server.start()


@pytest.fixture
def s3rver_server(monkeypatch, tmp_path):
    """A running s3rver with no buckets, storing under the test's tmp_path; stopped at teardown.
    Fails the test if node or s3rver is not installed (`make test` installs both: a missing one is a
    broken setup, not a pass). Its clients need S3rverServer.ACCESS_KEY_ID."""
    reason = S3rverServer.missing()
    if reason:
        pytest.fail(reason)
    for name in _UNSET_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with S3rverServer(directory=str(tmp_path / "s3rver"), log_path=str(tmp_path / "s3rver.log")) as server:
        yield server


class CuttingProxy:
    """A TCP proxy in front of a server that cuts the first `cuts` responses after `cut_after` bytes.

    Simulates transfers that break mid-body (client sees a short read); later connections pass through
    untouched. Point the client at `endpoint_url`. Threads are daemons; close() stops accepting.
    """

    def __init__(self, upstream_port: int, cut_after: int, cuts: int, host: str = "127.0.0.1"):
        self.host, self.upstream_port = host, upstream_port
        self.cut_after, self.cuts_left = cut_after, cuts
        self.cut = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                cut = self.cuts_left > 0
                if cut:
                    self.cuts_left -= 1
            threading.Thread(target=self._serve, args=(client, cut), daemon=True).start()

    def _serve(self, client: socket.socket, cut: bool) -> None:
        upstream = socket.create_connection((self.host, self.upstream_port))

        def pump_up():
            try:
                while data := client.recv(1 << 16):
                    upstream.sendall(data)
            except OSError:
                pass

        threading.Thread(target=pump_up, daemon=True).start()
        sent = 0
        try:
            while data := upstream.recv(1 << 16):
                if cut and sent + len(data) > self.cut_after:
                    client.sendall(data[:self.cut_after - sent])
                    with self._lock:
                        self.cut += 1
                    break
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
