"""mirrord config files as they are: short forms, warnings for mirrord keys
mtrace ignores, errors for keys neither knows, the default lookup, the
verify-config and config commands, and the env keys."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mtrace.cli.app import app
from mtrace.cli.config import Config, find_default, json_schema, load
from mtrace.cli.errors import ConfigError
from mtrace.cli.mirrord import BY_KEY, KEYS, markdown_table
from mtrace.tracer.features.env import merge_environment, read_env_file
from mtrace.tracer.features.policy import EnvConfig

ROOT = Path(__file__).resolve().parents[2]

# Written for these tests after the examples in mirrord's documentation.
BASIC = """{
  "target": "pid/1",
  "feature": {"env": true, "fs": "read", "network": true}
}"""

EVERYDAY = """{
  "target": "targetless",
  "skip_processes": ["bash"],
  "agent": {"ttl": 5, "log_level": "debug", "startup_timeout": 20},
  "feature": {
    "env": {"include": "DB_*;API_URL", "exclude": "DB_PASSWORD",
            "override": {"MODE": "dev"}, "mapping": {".+_TIMEOUT": "1000"},
            "unset": "AWS_PROFILE", "load_from_process": false},
    "fs": {"mode": "write", "read_write": ".+\\\\.json", "read_only": [".+\\\\.yaml"],
           "local": ".+\\\\.js", "readonly_file_buffer": 0},
    "network": {
      "outgoing": {"tcp": true, "udp": false, "ignore_localhost": true,
                   "filter": {"local": ":53"}},
      "dns": {"enabled": true, "filter": {"remote": ["db.internal"]}},
      "ipv6": true
    },
    "hostname": false,
    "copy_target": {"scale_down": true}
  },
  "experimental": {"hook_rename": true, "latency": {"receive_delay": 5}},
  "telemetry": false
}"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load_with_warnings(path: Path) -> tuple[Config, list[str]]:
    warnings: list[str] = []
    return load(path, warn=warnings.append), warnings


def test_basic_mirrord_file_is_accepted_without_warnings(tmp_path: Path) -> None:
    config, warnings = load_with_warnings(write(tmp_path, "mirrord.json", BASIC))
    assert warnings == []
    assert config.target == "pid/1" and config.feature.fs.mode == "read"
    assert config.feature.env.enabled and config.feature.network.outgoing.tcp


def test_everyday_mirrord_file_warns_once_per_ignored_key(tmp_path: Path) -> None:
    config, warnings = load_with_warnings(write(tmp_path, "mirrord.json", EVERYDAY))
    named = [warning.split("`")[1] for warning in warnings]
    assert named == ["skip_processes", "agent.log_level",
                     "feature.env.load_from_process", "feature.fs.readonly_file_buffer",
                     "feature.network.ipv6",
                     "experimental.hook_rename", "experimental.latency.receive_delay",
                     "telemetry"]
    assert all(warning.startswith(f"{tmp_path / 'mirrord.json'}: ") for warning in warnings)
    env = config.feature.env
    assert env.include == ["DB_*", "API_URL"] and env.exclude == ["DB_PASSWORD"]
    assert env.unset == ["AWS_PROFILE"] and env.mapping == {".+_TIMEOUT": "1000"}
    fs = config.feature.fs
    assert fs.read_write == [".+\\.json"] and fs.local == [".+\\.js"] and config.agent.write
    outgoing = config.feature.network.outgoing
    assert not outgoing.udp and outgoing.filter is not None and outgoing.filter.local == [":53"]
    assert config.agent.startup_timeout == 20 and not config.feature.hostname


@pytest.mark.parametrize(("text", "check"), [
    ('{"feature": {"fs": false}}', lambda c: c.feature.fs.mode == "local"),
    ('{"feature": {"fs": true}}', lambda c: c.feature.fs.mode == "read"),
    ('{"feature": {"env": false}}', lambda c: not c.feature.env.enabled),
    ('{"feature": {"network": false}}',
     lambda c: not c.feature.network.outgoing.tcp and not c.feature.network.dns.enabled),
    ('{"feature": {"network": {"outgoing": false}}}',
     lambda c: not c.feature.network.outgoing.udp),
    ('{"feature": {"network": {"dns": false}}}', lambda c: not c.feature.network.dns.enabled),
    ('{"target": null, "feature": {"fs": {"mode": null, "local": null}}}',
     lambda c: c.feature.fs.mode == "read" and c.feature.fs.local == []),
])
def test_mirrord_short_forms(tmp_path: Path, text: str, check: object) -> None:
    config, warnings = load_with_warnings(write(tmp_path, "m.json", text))
    assert warnings == [] and check(config)  # type: ignore[operator]


@pytest.mark.parametrize(("text", "key"), [
    ('{"feature": {"fs": {"mdoe": "read"}}}', "feature.fs.mdoe"),
    ('{"telemetri": false}', "telemetri"),
    ('{"experimental": {"hook_renam": true}}', "experimental.hook_renam"),
    ('{"internal_proxy": {"idle_timeout": 1, "typo": 2}}', "internal_proxy.typo"),
    ('{"feature": {"fs": "sometimes"}}', "feature.fs.mode"),
    ('{"feature": {"env": {"mapping": {"(": "x"}}}}', "feature.env.mapping"),
    ('{"feature": {"fs": {"mapping": {"^/a(": "/b"}}}}', "feature.fs.mapping"),
    ('{"feature": {"env": {"env_file": "/nonexistent/.env"}}}', "feature.env.env_file"),
    ('{"feature": {"hostname": "yes"}}', "feature.hostname"),
])
def test_bad_keys_and_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, "bad.json", text), warn=lambda _: None)
    assert f"at `{key}`" in caught.value.message
    assert "\n" not in caught.value.message and caught.value.exit_code == 78


def test_default_lookup_order(tmp_path: Path) -> None:
    assert find_default(tmp_path) is None
    write(tmp_path, ".mirrord/mirrord.json", "{}")
    assert find_default(tmp_path) == tmp_path / ".mirrord/mirrord.json"
    write(tmp_path, ".mtrace/config.json", "{}")
    assert find_default(tmp_path) == tmp_path / ".mtrace/config.json"
    write(tmp_path, ".mtrace/config.toml", "")
    assert find_default(tmp_path) == tmp_path / ".mtrace/config.toml"


def test_verify_config_prints_the_merged_config(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, ".mirrord/mirrord.json", EVERYDAY)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["verify-config", "--format", "json", "--fs-mode", "read"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["feature"]["fs"]["mode"] == "read"            # the flag
    assert printed["feature"]["env"]["unset"] == ["AWS_PROFILE"]  # the file
    assert printed["feature"]["network"]["dns"]["enabled"] is True  # a default
    assert "`telemetry` is a mirrord key mtrace ignores" in result.stderr
    toml = CliRunner().invoke(app, ["verify-config", "-f", ".mirrord/mirrord.json"])
    assert toml.exit_code == 0 and 'mode = "write"' in toml.stdout


def test_verify_config_bad_file_is_one_line_and_78(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.toml", '[feature.fs]\nmode = "sometimes"\n')
    result = CliRunner().invoke(app, ["verify-config", "-f", str(bad)])
    assert result.exit_code == 78
    errors = [line for line in result.stderr.splitlines() if line.startswith("mtrace: error:")]
    assert len(errors) == 1 and "`feature.fs.mode`" in errors[0]


def test_schema_is_generated_and_shipped_copy_matches() -> None:
    result = CliRunner().invoke(app, ["config", "schema"])
    assert result.exit_code == 0
    printed = json.loads(result.stdout)
    assert printed == json_schema()
    shipped = json.loads((ROOT / "docs" / "config-schema.json").read_text())
    assert shipped == printed, "regenerate: mtrace config schema > docs/config-schema.json"
    features = printed["$defs"]["FeatureConfig"]["properties"]
    assert {"env", "fs", "network", "hostname"} <= set(features)


def test_docs_table_lists_every_mirrord_key() -> None:
    assert len(BY_KEY) == len(KEYS)
    text = (ROOT / "docs" / "mirrord.md").read_text()
    assert markdown_table(Config) in text, "regenerate: mtrace config mirrord-keys"


def test_environment_unset_env_file_and_mapping(tmp_path: Path) -> None:
    env_file = write(tmp_path, ".env", "# comment\nexport FROM_FILE='a b'\nSHARED=file\n"
                     'QUOTED="x=1"\nEMPTY=\n')
    from_file = read_env_file(str(env_file))
    assert from_file == {"FROM_FILE": "a b", "SHARED": "file", "QUOTED": "x=1", "EMPTY": ""}
    local = {"PATH": "/bin", "AWS_PROFILE": "me", "aws_profile": "me2"}
    target = {"SHARED": "target", "CONNECT_TIMEOUT": "5", "DATA_12": "x", "MODE": "prod"}
    config = EnvConfig(override={"MODE": "dev"}, unset=["AWS_PROFILE"],
                       mapping={".+_TIMEOUT": "1000", r"^(?<kind>\w+)_(\d+)$": "${kind}-$2"})
    merged = merge_environment(local, target, config, from_file)
    assert merged == {"PATH": "/bin", "SHARED": "file", "CONNECT_TIMEOUT": "1000",
                      "DATA_12": "DATA-12", "MODE": "dev", "FROM_FILE": "a b",
                      "QUOTED": "x=1", "EMPTY": ""}


def test_env_file_relative_to_current_directory(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "app.env", "A=1\n")
    monkeypatch.chdir(tmp_path)
    config = load(write(tmp_path, "c.toml", '[feature.env]\nenv_file = "app.env"\n'))
    assert config.feature.env.env_file == "app.env" and os.path.isfile("app.env")


def test_start_summary_lines() -> None:
    from mtrace.cli.summary import feature_lines

    config = load_with_warnings_text('{"feature": {"env": {"include": "DB_*", "unset": "X"}, '
                                     '"fs": "write", "network": {"dns": false, "outgoing": '
                                     '{"udp": false, "filter": {"local": ":53"}}}}}')
    lines = feature_lines(config, "pid/7", "web-1")
    assert lines == [
        "target: pid/7",
        "env: the target's DB_*; PATH, TERM, HOME kept local; unset X",
        "fs: write: reads and writes go to the target",
        "incoming: mirror (the program gets a copy, the target answers) on the ports the program listens on",
        "outgoing: tcp connections leave from the target, except to :53",
        "dns: off: names are resolved by this machine",
        "hostname: the target's (web-1)",
    ]


def load_with_warnings_text(text: str) -> Config:
    import msgspec

    from mtrace.cli.config import from_data

    return from_data(msgspec.json.decode(text), "test")


# Written for these tests after the shape of mirrord's "complete" example: keys of
# other issues (Kubernetes, incoming) and of mirrord-only machinery.
COMPLETE = """{
  "accept_invalid_certificates": false,
  "skip_processes": "ide-debugger",
  "kubeconfig": "~/.kube/config",
  "kube_context": "dev",
  "operator": false,
  "telemetry": false,
  "sip_binaries": "bash",
  "internal_proxy": {"start_idle_timeout": 30, "idle_timeout": 5},
  "startup_retry": {"min_ms": 100, "max_retries": 1},
  "agent": {"namespace": "default", "image": "example/agent:1", "ephemeral": true,
            "dns": {"timeout": 2}},
  "feature": {
    "env": {"include": "USER;PUBLIC_*", "override": {"A": "b"}},
    "fs": {"mode": "write", "read_write": ".+\\\\.json", "not_found": ["\\\\.config/gcloud"]},
    "network": {
      "incoming": {"mode": "steal", "http_filter": {"header_filter": "^x-dev: 1$"},
                   "port_mapping": [[7777, 8888]]},
      "outgoing": {"tcp": true, "udp": true, "filter": {"local": ["tcp://1.1.1.0/24:1337"]},
                   "unix_streams": "bear.+"},
      "dns": {"enabled": true, "filter": {"local": ["1.1.1.0/24:1337"]}}
    },
    "copy_target": {"scale_down": false},
    "hostname": true
  }
}"""


def test_complete_mirrord_file_names_each_ignored_key(tmp_path: Path) -> None:
    config, warnings = load_with_warnings(write(tmp_path, "mirrord.json", COMPLETE))
    named = {warning.split("`")[1] for warning in warnings}
    expected = {"accept_invalid_certificates", "skip_processes", "operator", "telemetry",
                "sip_binaries", "internal_proxy.start_idle_timeout", "internal_proxy.idle_timeout",
                "startup_retry.min_ms", "startup_retry.max_retries", "agent.dns.timeout"}
    assert named == expected, warnings
    assert len(warnings) == len(named)
    assert config.feature.network.outgoing.unix_streams == ["bear.+"]
    assert config.feature.fs.mode == "write" and config.agent.write
