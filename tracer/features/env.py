"""The tracee's environment: the target's variables merged with the local ones."""

from __future__ import annotations

from collections.abc import Mapping
from fnmatch import fnmatchcase

from .policy import EnvConfig


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def merge_environment(local: Mapping[str, str], target: Mapping[str, str],
                      config: EnvConfig) -> dict[str, str]:
    """Local variables, then the target's (filtered by include/exclude) over them,
    then ``keep_local`` restored, then overrides; in that order of precedence."""
    merged = dict(local)
    if config.enabled:
        for name, value in target.items():
            if config.include is not None and not _matches(name, config.include):
                continue
            if _matches(name, config.exclude):
                continue
            merged[name] = value
        for name in config.keep_local:
            if name in local:
                merged[name] = local[name]
    merged.update(config.override)
    return merged
