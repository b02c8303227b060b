"""Hypothesis strategies for every protocol message (used by unit and integration tests)."""

from __future__ import annotations

import types
import typing
from typing import Any

import msgspec
from hypothesis import strategies as st

_INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


#: Structs nested deeper than this get their defaults (HttpRequestFilter
#: contains itself: unbounded nesting only finds Python's recursion limit).
MAX_DEPTH = 4


def strategy_for(
    annotation: Any, overrides: dict[type, st.SearchStrategy[Any]] | None = None, _depth: int = 0
) -> st.SearchStrategy[Any]:
    """A strategy for a protocol type annotation (structs, unions, containers, scalars).

    ``overrides`` replaces the strategy of whole struct types (e.g. to keep
    generated TcpConnect requests on loopback).
    """
    if overrides and annotation in overrides:
        return overrides[annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([strategy_for(arg, overrides, _depth) for arg in typing.get_args(annotation)])
    if origin is list:
        (item,) = typing.get_args(annotation)
        return st.lists(strategy_for(item, overrides, _depth), max_size=4)
    if origin is tuple:
        return st.tuples(*(strategy_for(arg, overrides, _depth) for arg in typing.get_args(annotation)))
    if origin is typing.Literal:
        return st.sampled_from(typing.get_args(annotation))
    if annotation is type(None):
        return st.none()
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return _INT64
    if annotation is float:
        return st.floats(allow_nan=False)
    if annotation is str:
        return st.text(max_size=40)
    if annotation is bytes:
        return st.binary(max_size=200)
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        struct = annotation
        if _depth >= MAX_DEPTH and len(struct.__struct_defaults__) == len(struct.__struct_fields__):
            return st.just(struct())
        # Deferred: a struct may contain itself (HttpRequestFilter.any_of).
        return st.deferred(lambda: st.builds(
            struct,
            **{name: strategy_for(typing.get_type_hints(struct)[name], overrides, _depth + 1)
               for name in struct.__struct_fields__},
        ))
    raise TypeError(f"no strategy for {annotation!r}")
