"""Secrets files (tokens, TLS keys, the S3 secret) that group or others may read or write, or that
are not regular files, are refused with the key, the file and its mode named."""

from __future__ import annotations

import os

import pytest

from kvtier.daemon import config
from kvtier.daemon.s3sync import tier_config

SECRETS = {  # the key under test, and what else the config needs for it to be valid
    "server.tokens_file": {},
    "server.tls_key": {"server": {"tls_cert": "/nonexistent/cert.pem"}},
    "peers.tls_key": {},
    "s3.secret_access_key_file": {"s3": {"access_key_id": "AKIA-TEST", "bucket": "b"}},
}


def load_with(key: str, path: str) -> config.Config:
    section, name = key.split(".")
    overrides = {section: {}, **{s: dict(v) for s, v in SECRETS[key].items()}}
    overrides.setdefault(section, {})[name] = path
    return config.load(overrides=overrides)


def secret_file(tmp_path, mode: int) -> str:
    path = tmp_path / "secret"
    path.write_text("not really a secret\n")
    path.chmod(mode)
    return str(path)


@pytest.mark.parametrize("key", SECRETS)
@pytest.mark.parametrize("mode, exposed", [(0o644, "readable"), (0o666, "readable and writable"),
                                           (0o640, "readable"), (0o602, "writable")])
def test_a_secret_others_can_read_or_write_is_refused(tmp_path, key, mode, exposed):
    path = secret_file(tmp_path, mode)
    with pytest.raises(config.ConfigError) as err:
        load_with(key, path)
    assert str(err.value) == f"{key} {path} is {exposed} by group/others (mode {mode:04o}); chmod 600 it"


@pytest.mark.parametrize("key", SECRETS)
@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_secret_only_its_owner_can_read_is_accepted(tmp_path, key, mode):
    path = secret_file(tmp_path, mode)
    section, name = key.split(".")
    assert getattr(getattr(load_with(key, path), section), name) == path


@pytest.mark.parametrize("key", SECRETS)
def test_a_secret_that_is_not_a_regular_file_or_is_missing_is_refused(tmp_path, key):
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    with pytest.raises(config.ConfigError, match=f"^{key} {directory} is not a regular file$"):
        load_with(key, str(directory))
    with pytest.raises(config.ConfigError, match=f"^{key} {tmp_path}/missing does not exist$"):
        load_with(key, str(tmp_path / "missing"))


def test_the_s3_secret_is_checked_again_when_it_is_read(tmp_path):
    path = secret_file(tmp_path, 0o600)
    cfg = load_with("s3.secret_access_key_file", path)
    assert tier_config(cfg.s3).secret_access_key == "not really a secret"
    os.chmod(path, 0o644)  # loosened after the config was loaded
    with pytest.raises(config.ConfigError, match="mode 0644"):
        tier_config(cfg.s3)


@pytest.mark.parametrize("key", SECRETS)
def test_a_secret_owned_by_another_user_is_refused(tmp_path, key):
    """Mode 0600 is no defence when the file is someone else's: its owner reads or rewrites it (and
    may chmod it wider at any time)."""
    path = secret_file(tmp_path, 0o600)
    os.chown(path, 40031, 40031)
    with pytest.raises(config.ConfigError) as err:
        load_with(key, path)
    assert str(err.value) == (f"{key} {path} is owned by uid 40031, not by kvtierd's user (uid {os.geteuid()}) or "
                              "root: its owner can read or replace it; chown it to kvtierd's user")
