"""Config: embedded defaults, TOML parsing, and clear refusals of inconsistent settings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvtier.daemon import config


def test_embedded_defaults():
    cfg = config.load()
    assert cfg.cpu.capacity == 1 << 30 and cfg.disk.capacity == 8 << 30
    assert cfg.server.socket.endswith("kvtierd.sock") and not cfg.server.tcp and not cfg.metrics.listen


def test_sizes_and_modes_parse(tmp_path):
    path = tmp_path / "k.toml"
    path.write_text('[cpu]\ncapacity = "64MiB"\nslot_bytes = 65536\n[server]\nsocket_mode = "0600"\n')
    cfg = config.load(str(path))
    assert cfg.cpu.capacity == 64 << 20 and cfg.cpu.slot_bytes == 65536 and cfg.server.socket_mode == 0o600


@pytest.mark.parametrize("text, message", [
    ('[cpu]\ncapacty = "1GiB"\n', "unknown config key 'cpu.capacty'"),
    ('[cpu]\ncapacity = "lots"\n', "cpu.capacity: expected a size"),
    ('[cpu]\nslot_bytes = 1000\n', "multiple of 4096"),
    ('[disk]\ncapacity = "512MiB"\n', "must not be smaller than cpu.capacity"),
    ('[disk]\nenabled = "yes"\n', "expected true or false"),
    ('[server]\ntcp = "127.0.0.1:7000"\n', "needs server.tokens_file"),
    ('[server]\ntcp = "127.0.0.1:7000"\ntokens_file = "t"\n', "needs server.tls_cert"),
    ('[peers]\naddresses = "10.0.0.2:7701"\n', "expected a list"),
    ('[peers]\ntransport = "rdma"\n', "peers.transport"),
    ('cpu = 3\n', "expected a [table]"),
    ('[cpu\n', "not valid TOML"),
])
def test_invalid_configs_are_refused_with_the_key_named(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError, match=message.replace("[", r"\[")):
        config.load(str(path))


def test_kvtierd_exits_2_with_the_reason(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[disk]\ncapacity = "1MiB"\n')
    proc = subprocess.run([sys.executable, "-m", "kvtier.daemon.main", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "invalid configuration" in proc.stderr and "disk.capacity" in proc.stderr


def test_shipped_example_config_documents_the_defaults():
    import pathlib
    example = pathlib.Path(__file__).parents[2] / "packaging" / "kvtierd.example.toml"
    assert config.load(str(example)) == config.load()
