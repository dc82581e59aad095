"""Every endpoint accounted for: what a default kvtierd listens on, and who may reach the KV-event
sockets (events.zmq_endpoint, events.zmq_replay_endpoint) and /metrics (metrics.listen).

The KV events name every namespace and block hash on the node and have no authentication, so an
ipc:// socket file is created with events.ipc_mode (0600) and tcp:// or /metrics beyond loopback
needs allow_remote. The tests run as root; the unprivileged user is `nobody`, through setpriv.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap

import pytest

from conftest import wait_for
from test_kv_events import wait_subscribed
from kvtier.daemon import config

SETPRIV = shutil.which("setpriv")  # util-linux
AS_NOBODY = [SETPRIV or "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def require_nobody() -> None:
    """The suite runs as root with util-linux; without them the check fails (a skip would hide it)."""
    if SETPRIV is None or os.geteuid() != 0:
        pytest.fail("running a process as nobody needs root and setpriv (util-linux)")

# Run as `nobody`: connect a plain AF_UNIX socket to each path (ZMQ's ipc connect is lazy and would
# hide the refusal) and print one line per path: OK, or the exception's class name.
CONNECT = textwrap.dedent("""
    import socket, sys
    for path in sys.argv[1:]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            print("OK")
        except OSError as e:
            print(type(e).__name__)
        finally:
            s.close()
""")


@pytest.fixture
def shared_dir():
    """A directory every user may traverse (0755), so that only the socket file's own mode decides
    (pytest's tmp_path is under a 0700 directory, which would refuse `nobody` by itself)."""
    path = tempfile.mkdtemp(prefix="kvev-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def connect_as_nobody(*paths: str) -> list[str]:
    require_nobody()
    done = subprocess.run([*AS_NOBODY, sys.executable, "-c", CONNECT, *paths],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def mode(path: str) -> int:
    info = os.lstat(path)
    assert stat.S_ISSOCK(info.st_mode), f"{path} is not a socket"
    return stat.S_IMODE(info.st_mode)


# ---- defaults -----------------------------------------------------------------------------------

def listening_sockets(pid: int) -> tuple[list[str], list[str]]:
    """(TCP/UDP listeners as "proto local-address", Unix listeners by path) among the fds of `pid`."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    inet = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        with open(f"/proc/{pid}/net/{proto}") as file:
            for line in file.readlines()[1:]:
                fields = line.split()
                listening = fields[3] == "0A" if proto.startswith("tcp") else True
                if fields[9] in inodes and listening:
                    inet.append(f"{proto} {fields[1]}")
    unix = []
    with open(f"/proc/{pid}/net/unix") as file:
        for line in file.readlines()[1:]:
            fields = line.split()
            if fields[6] in inodes and int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON: listening
                unix.append(fields[7] if len(fields) > 7 else "(unnamed)")
    return inet, unix


def test_defaults_have_no_event_endpoint_and_no_metrics_listener(make_daemon):
    cfg = config.load()
    assert cfg.events.zmq_endpoint == "" and cfg.events.zmq_replay_endpoint == ""
    assert cfg.metrics.listen == "" and not cfg.metrics.allow_remote and not cfg.events.allow_remote
    assert cfg.events.ipc_mode == 0o600 and not cfg.server.tcp and not cfg.peers.listen
    daemon = make_daemon()  # the defaults, with the test sizes and a socket path of its own
    inet, unix = listening_sockets(daemon.pid)
    assert inet == [], f"a default kvtierd listens on {inet}"
    # The shared gRPC socket, the local-session socket beside it (daemon/sessions.py), and the
    # administrators' own socket in the private directory (daemon/local_sockets.py).
    assert set(unix) == {daemon.socket, daemon.socket + ".session", daemon.socket + ".d/0.sock"}, \
        f"a default kvtierd listens on {unix}"
    assert "KV events" not in daemon.log()


def test_example_config_lists_the_new_keys_with_their_defaults():
    import pathlib
    text = (pathlib.Path(__file__).parents[2] / "packaging" / "kvtierd.example.toml").read_text()
    events = text[text.index("[events]"):].split("\n[", 1)[0]
    metrics = text[text.index("[metrics]"):].split("\n[", 1)[0]
    assert 'ipc_mode = "0600"' in events and "allow_remote = false" in events and 'zmq_endpoint = ""' in events
    assert "allow_remote = false" in metrics and 'listen = ""' in metrics
    assert "0.0.0.0" not in events and "0.0.0.0" not in metrics


# ---- config refusals ----------------------------------------------------------------------------

def load(tmp_path, text: str) -> config.Config:
    path = tmp_path / "k.toml"
    path.write_text(text)
    return config.load(str(path))


@pytest.mark.parametrize("text, message", [
    ('[events]\nzmq_endpoint = "tcp://0.0.0.0:5557"\n',
     "whoever can reach it reads every namespace name and block hash"),
    ('[events]\nzmq_endpoint = "tcp://*:5557"\n', "events.allow_remote = true"),
    ('[events]\nzmq_endpoint = "tcp://[::]:5557"\n', "beyond loopback"),
    ('[events]\nzmq_endpoint = "tcp://10.1.2.3:5557"\n', "beyond loopback"),
    ('[events]\nzmq_endpoint = "tcp://eth0:5557"\n', "beyond loopback"),
    ('[events]\nzmq_endpoint = "ipc:///tmp/e.sock"\nzmq_replay_endpoint = "tcp://0.0.0.0:5558"\n',
     "events.zmq_replay_endpoint = 'tcp://0.0.0.0:5558' listens beyond loopback"),
    ('[events]\nzmq_endpoint = "ipc://@kv-events"\n', "abstract"),
    ('[events]\nzmq_endpoint = "ipc://*"\n', "needs a socket file path"),
    ('[events]\nzmq_endpoint = "inproc://events"\n', "must be \"ipc://<path>\" or \"tcp://<host>:<port>\""),
    ('[events]\nzmq_endpoint = "tcp://127.0.0.1"\n', "tcp://<host>:<port>"),
    ('[events]\nzmq_endpoint = "ipc:///tmp/e.sock"\nzmq_replay_endpoint = "ipc:///tmp/e.sock"\n', "must differ"),
    ('[events]\nzmq_replay_endpoint = "ipc:///tmp/r.sock"\n', "needs events.zmq_endpoint"),
    ('[events]\nipc_mode = "rw"\n', "events.ipc_mode: expected an octal mode"),
    ('[metrics]\nlisten = "0.0.0.0:9477"\n', "node-wide counters"),
    ('[metrics]\nlisten = "[::]:9477"\n', "metrics.allow_remote = true"),
    ('[metrics]\nlisten = "node7.example:9477"\n', "beyond loopback"),
    ('[metrics]\nlisten = "9477"\n', "host:port"),
])
def test_config_refuses_open_endpoints_without_allow_remote(tmp_path, text, message):
    with pytest.raises(config.ConfigError, match=message.replace("[", r"\[").replace("*", r"\*")):
        load(tmp_path, text)


@pytest.mark.parametrize("text", [
    '[events]\nzmq_endpoint = "tcp://127.0.0.1:5557"\nzmq_replay_endpoint = "tcp://[::1]:5558"\n',
    '[events]\nzmq_endpoint = "tcp://localhost:5557"\n',
    '[events]\nzmq_endpoint = "tcp://0.0.0.0:5557"\nallow_remote = true\n',
    '[events]\nzmq_endpoint = "tcp://*:5557"\nzmq_replay_endpoint = "tcp://*:5558"\nallow_remote = true\n',
    '[events]\nzmq_endpoint = "ipc://kvtier-data/kv-events.sock"\n'
    'zmq_replay_endpoint = "ipc://kvtier-data/kv-replay.sock"\n',
    '[metrics]\nlisten = "127.0.0.1:9477"\n',
    '[metrics]\nlisten = "localhost:9477"\n',
    '[metrics]\nlisten = "[::1]:9477"\n',
    '[metrics]\nlisten = "0.0.0.0:9477"\nallow_remote = true\n',
])
def test_config_accepts_loopback_ipc_and_explicit_allow_remote(tmp_path, text):
    load(tmp_path, text)


def test_ipc_mode_parses_like_socket_mode(tmp_path):
    cfg = load(tmp_path, '[events]\nzmq_endpoint = "ipc:///tmp/e.sock"\nipc_mode = "0660"\n')
    assert cfg.events.ipc_mode == 0o660


@pytest.mark.parametrize("text, key", [
    ('[events]\nzmq_endpoint = "tcp://0.0.0.0:5557"\n', "events.zmq_endpoint"),
    ('[metrics]\nlisten = "0.0.0.0:9477"\n', "metrics.listen"),
])
def test_kvtierd_refuses_an_open_endpoint_and_exits_2(tmp_path, text, key):
    path = tmp_path / "open.toml"
    path.write_text(f'data_dir = "{tmp_path}/data"\n{text}')
    proc = subprocess.run([sys.executable, "-m", "kvtier.daemon.main", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "invalid configuration" in proc.stderr and key in proc.stderr and "allow_remote" in proc.stderr


# ---- ipc socket files ---------------------------------------------------------------------------

def ipc_daemon(make_daemon, directory: str, **extra):
    pub, replay = os.path.join(directory, "kv-events.sock"), os.path.join(directory, "kv-replay.sock")
    daemon = make_daemon({"events.zmq_endpoint": f"ipc://{pub}", "events.zmq_replay_endpoint": f"ipc://{replay}",
                          **extra})
    return daemon, pub, replay


def test_ipc_sockets_are_0600_when_ready_and_nobody_cannot_connect(make_daemon, shared_dir):
    daemon, pub, replay = ipc_daemon(make_daemon, shared_dir)
    # make_daemon returned once the daemon is serving: the files have their mode by then.
    assert mode(pub) == 0o600 and mode(replay) == 0o600
    assert os.stat(pub).st_uid == os.geteuid()
    assert sorted(os.listdir(shared_dir)) == ["kv-events.sock", "kv-replay.sock"]  # no private dir left behind
    assert f"KV events (vLLM format) on ipc://{pub}, replay on ipc://{replay} (socket files mode 0600)" in daemon.log()
    # The control: in the same directory, `nobody` does reach a socket whose mode lets it.
    control = os.path.join(shared_dir, "control.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(control)
    os.chmod(control, 0o666)
    listener.listen(1)
    try:
        assert connect_as_nobody(pub, replay, control) == ["PermissionError", "PermissionError", "OK"]
    finally:
        listener.close()
    # Root still can (a router running as the daemon's user).
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.connect(pub)
    probe.close()


# A ZMQ subscriber as `nobody`: says whether ZMQ connected or had to retry (its monitor's first
# event), then counts the batches it receives until a line arrives on stdin.
SUBSCRIBER = textwrap.dedent("""
    import select, sys, zmq
    from zmq.utils.monitor import recv_monitor_message
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    monitor = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED)
    sub.connect("ipc://" + sys.argv[1])
    assert monitor.poll(30_000), "no monitor event"
    event = recv_monitor_message(monitor)["event"]
    print("connected" if event == zmq.EVENT_CONNECTED else "retrying", flush=True)
    got = 0
    while not select.select([sys.stdin], [], [], 0)[0]:
        if sub.poll(50):
            sub.recv_multipart()
            got += 1
    print("received", got)
    sub.disable_monitor()
    monitor.close(0)
    sub.close(0)
    ctx.term()
""")


def test_nobody_subscriber_receives_no_block_events(make_daemon, shared_dir):
    """`nobody`'s ZMQ SUB never connects and receives nothing, while a subscriber running as the
    daemon's user receives every batch published meanwhile."""
    import zmq
    require_nobody()
    daemon, pub, _ = ipc_daemon(make_daemon, shared_dir, **{"events.zmq_topic": "kvtier"})  # "kvtier/<namespace>"
    nobody = subprocess.Popen([*AS_NOBODY, sys.executable, "-c", SUBSCRIBER, pub], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"ipc://{pub}")
    try:
        assert nobody.stdout.readline().strip() == "retrying"  # ZMQ's connect to the socket file failed
        with daemon.client() as c:
            wait_subscribed(c, sub)
            c.register_namespace("team-a/secret")
            c.put_blocks("team-a/secret", [(bytes([i]) * 32, b"", b"v" * 1000) for i in range(1, 21)],
                         wait_durable=True)
            secret = []

            def root_has_them():
                while sub.poll(50):
                    topic, _, _ = sub.recv_multipart()
                    if topic == b"kvtier/team-a/secret":
                        secret.append(topic)
                return len(secret) >= 2  # the CPU batch and the disk batch (at least)
            wait_for(root_has_them, what="the secret namespace's batches at the root subscriber")
        out, err = nobody.communicate("stop\n", timeout=60)
    finally:
        sub.close(0)
        context.term()
        nobody.kill()
        nobody.wait()
    assert nobody.returncode == 0, err
    assert out.split() == ["received", "0"]


def test_configured_ipc_mode_is_applied(make_daemon, shared_dir):
    _, pub, replay = ipc_daemon(make_daemon, shared_dir, **{"events.ipc_mode": "0660"})
    assert mode(pub) == 0o660 and mode(replay) == 0o660


def test_stale_socket_file_is_replaced_and_files_are_removed_at_stop(make_daemon, shared_dir):
    stale = os.path.join(shared_dir, "kv-events.sock")
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(stale)  # bound, never listening: what a kill -9 leaves behind
    os.chmod(stale, 0o777)
    leftover.close()
    daemon, pub, replay = ipc_daemon(make_daemon, shared_dir)
    assert mode(pub) == 0o600 and mode(replay) == 0o600
    assert daemon.stop() == 0
    assert os.listdir(shared_dir) == []


def test_ipc_directory_must_exist(make_daemon, shared_dir):
    missing = os.path.join(shared_dir, "nope")
    daemon = make_daemon({"events.zmq_endpoint": f"ipc://{missing}/kv-events.sock"}, start=False)
    with pytest.raises(RuntimeError, match="exited with 1"):
        daemon.start()
    assert f"directory {missing} does not exist" in daemon.log()
    assert not os.path.exists(missing)


@pytest.mark.parametrize("occupant, message", [("file", "exists and is not a socket"),
                                               ("server", "is in use by a running server")])
def test_ipc_path_held_by_a_regular_file_or_a_live_server_is_refused(make_daemon, shared_dir, occupant, message):
    path = os.path.join(shared_dir, "kv-events.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if occupant == "file":
        with open(path, "w") as file:
            file.write("not a socket")
    else:
        server.bind(path)
        server.listen(1)
    try:
        daemon = make_daemon({"events.zmq_endpoint": f"ipc://{path}"}, start=False)
        with pytest.raises(RuntimeError, match="exited with 1"):
            daemon.start()
        assert message in daemon.log()
        assert os.path.exists(path) and os.listdir(shared_dir) == ["kv-events.sock"]  # left as it was
    finally:
        server.close()
