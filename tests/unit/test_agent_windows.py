"""The pool the agent's stream windows come out of (agent/net.py)."""

from __future__ import annotations

import random

from mtrace.agent.net import (
    INITIAL_STREAM_WINDOW,
    MIN_STREAM_WINDOW,
    WindowPool,
)
from mtrace.agent.protocol import DEFAULT_WINDOW


def test_a_flowing_stream_grows_its_window_to_the_default_while_the_pool_has_room() -> None:
    pool = WindowPool(16 << 20)
    window = pool.take()
    assert window == INITIAL_STREAM_WINDOW
    for _ in range(10):
        window += pool.adjust(window, 4096)
    assert window == DEFAULT_WINDOW
    assert pool.granted == DEFAULT_WINDOW


def test_streams_opened_while_the_pool_is_spent_get_the_minimum_and_big_windows_shrink_back() -> None:
    pool = WindowPool(1 << 20)
    windows = [pool.take() for _ in range(16)]  # 16 x 64 KiB: the whole pool
    assert pool.granted == 1 << 20
    late = pool.take()
    assert late == MIN_STREAM_WINDOW and pool.granted > pool.limit
    change = pool.adjust(windows[0], 64 * 1024)
    assert change < 0 and pool.granted == pool.limit  # gave back exactly the excess


def test_the_pool_never_lets_credit_go_negative_nor_a_window_below_the_minimum() -> None:
    rng = random.Random(14)
    pool = WindowPool(2 << 20)
    windows = [pool.take(DEFAULT_WINDOW if rng.random() < 0.2 else None) for _ in range(64)]
    for _ in range(20_000):
        index = rng.randrange(len(windows))
        consumed = rng.randrange(1, windows[index] + 1)
        change = pool.adjust(windows[index], consumed)
        assert consumed + change >= 0
        windows[index] += change
        assert MIN_STREAM_WINDOW <= windows[index] <= DEFAULT_WINDOW
        assert pool.granted == sum(windows)
    # Once everything has flowed, the total is back under the limit (plus the minimums).
    assert pool.granted <= pool.limit + len(windows) * MIN_STREAM_WINDOW
    for window in windows:
        pool.give_back(window)
    assert pool.granted == 0
