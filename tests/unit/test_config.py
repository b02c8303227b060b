"""Config files: decoding, the key named in every error, flags over the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtrace.cli.config import Config, load, parse_address
from mtrace.cli.errors import ConfigError
from mtrace.tracer.features.env import merge_environment
from mtrace.tracer.features.policy import EnvConfig


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_toml_json_yaml_decode_the_same(tmp_path: Path) -> None:
    toml = write(tmp_path, "a.toml", 'target = "pid/1"\n[feature.fs]\nmode = "write"\n'
                 'local = ["^/home/"]\n[feature.network.outgoing]\nignore_localhost = true\n')
    json = write(tmp_path, "a.json", '{"target": "pid/1", "feature": {"fs": {"mode": "write", '
                 '"local": ["^/home/"]}, "network": {"outgoing": {"ignore_localhost": true}}}}')
    yaml = write(tmp_path, "a.yaml", "target: pid/1\nfeature:\n  fs:\n    mode: write\n"
                 "    local: ['^/home/']\n  network:\n    outgoing:\n      ignore_localhost: true\n")
    configs = [load(path) for path in (toml, json, yaml)]
    assert configs[0] == configs[1] == configs[2]
    assert configs[0].feature.fs.mode == "write" and configs[0].agent.write


@pytest.mark.parametrize(("text", "key"), [
    ('[feature.fs]\nmode = "sometimes"\n', "feature.fs.mode"),
    ("[feature.env]\ninclude = 3\n", "feature.env.include"),
    ("[feature.fs]\nunknown_key = 1\n", "feature.fs.unknown_key"),
    ('[feature.fs]\nlocal = ["("]\n', "feature.fs.local[0]"),
    ('[feature.network.outgoing.filter]\nremote = ["a"]\nlocal = ["b"]\n',
     "feature.network.outgoing.filter"),
    ('[agent]\naddress = "nohost"\n', "agent.address"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, "bad.toml", text))
    assert f"`{key}`" in caught.value.message


def test_unreadable_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="unknown config format"):
        load(write(tmp_path, "config.ini", "x=1"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "broken.toml", "[[["))


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:7000") == ("127.0.0.1", 7000)
    assert parse_address("[::1]:80") == ("::1", 80)
    for bad in ("7000", "host:", "host:99999", ":80"):
        with pytest.raises(ConfigError):
            parse_address(bad)


def test_defaults() -> None:
    config = Config()
    assert config.feature.fs.mode == "read" and config.backend == "auto"


def test_environment_merge_order() -> None:
    local = {"PATH": "/local/bin", "HOME": "/root", "ONLY_LOCAL": "l", "SHARED": "local"}
    target = {"PATH": "/target/bin", "SHARED": "target", "DB_URL": "db", "SECRET": "s"}
    merged = merge_environment(local, target, EnvConfig(exclude=["SECRET"],
                                                        override={"LOG": "debug"}))
    assert merged == {"PATH": "/local/bin", "HOME": "/root", "ONLY_LOCAL": "l",
                      "SHARED": "target", "DB_URL": "db", "LOG": "debug"}
    only_db = merge_environment(local, target, EnvConfig(include=["DB_*"]))
    assert only_db["DB_URL"] == "db" and only_db["SHARED"] == "local"
    assert merge_environment(local, target, EnvConfig(enabled=False)) == local
