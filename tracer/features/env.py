"""The tracee's environment: the target's variables merged with the local ones."""

from __future__ import annotations

from collections.abc import Mapping
from fnmatch import fnmatchcase

from .policy import EnvConfig, compile_pattern, python_replacement


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def merge_environment(local: Mapping[str, str], target: Mapping[str, str],
                      config: EnvConfig, env_file: Mapping[str, str] | None = None
                      ) -> dict[str, str]:
    """Local variables, then the target's (filtered by include/exclude) over them,
    then ``keep_local`` restored, then the env file's, then overrides; in that
    order of precedence. Then ``mapping`` rewrites values and ``unset`` removes
    names, as mirrord does."""
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
    merged.update(env_file or {})
    merged.update(config.override)
    for pattern, replacement in config.mapping.items():
        regex = compile_pattern(pattern)
        template = python_replacement(replacement)
        for name in merged:
            match = regex.search(name)
            if match:
                merged[name] = match.expand(template)
    unset = {name.casefold() for name in config.unset}
    return {name: value for name, value in merged.items() if name.casefold() not in unset}


def read_env_file(path: str) -> dict[str, str]:
    """A dotenv file's variables (python-dotenv's parser: quotes, ``export``,
    comments and ``${VAR}`` expansion as everyone else reads them)."""
    from dotenv import dotenv_values

    return {name: value or "" for name, value in dotenv_values(path).items()}
