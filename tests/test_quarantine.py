"""Quarantine core: who keeps failing, and for how long it stays out of plans (manual clock)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_inference.core.quarantine import (
    MAX_TRACKED,
    Quarantine,
    QuarantineEntry,
    QuarantinePolicy,
)

P = QuarantinePolicy(threshold=3, window=60, base=10, cap=600, healthy_after=600, incident_gap=1)
W = "00000000000000aa"


def fail_times(q: Quarantine, times: list[float], peer: str = W) -> list[bool]:
    return [q.record_failure(peer, f"failure at {t}", t) for t in times]


def test_policy_is_validated() -> None:
    for bad in (dict(threshold=0), dict(base=0), dict(cap=5, base=10), dict(window=0),
                dict(healthy_after=-1), dict(incident_gap=-1)):  # fmt: skip
        with pytest.raises(ValueError):
            QuarantinePolicy(**bad)  # type: ignore[arg-type]


def test_threshold_failures_within_the_window_quarantine_for_base_seconds() -> None:
    q = Quarantine(P)
    assert fail_times(q, [100, 110]) == [False, False]
    assert not q.is_quarantined(W, 111) and q.get_timer() is None
    assert q.record_failure(W, "rpc-server went down", 120)
    assert q.entry(W, 121) == QuarantineEntry("rpc-server went down", 130.0, 1)
    assert q.quarantined(129.9) == {W} and q.get_timer() == 130.0
    assert q.handle_timer(129.9) == [] and q.is_quarantined(W, 129.9)
    assert q.handle_timer(130.0) == [W]
    assert not q.is_quarantined(W, 130.0) and q.entry(W, 130.0) is None
    assert q.get_timer() is None


def test_failures_spread_wider_than_the_window_never_add_up() -> None:
    q = Quarantine(P)
    assert not any(fail_times(q, [0, 40, 80, 120, 160, 200]))
    assert q.failures(W) == 2


def test_one_incident_reported_several_times_counts_once() -> None:
    q = Quarantine(P)
    # the tunnel fails, then the engine crashes naming the endpoint: one incident
    assert not any(fail_times(q, [10.0, 10.2, 10.5, 10.9]))
    assert q.failures(W) == 1


def test_back_off_doubles_on_probation_up_to_the_cap() -> None:
    q = Quarantine(P)
    now = 0.0
    fail_times(q, [now, now + 2, now + 4])
    durations = []
    for _ in range(9):
        entry = q.entry(W, now + 4)
        assert entry is not None
        durations.append(entry.until - (now + 4))
        now = entry.until
        assert q.handle_timer(now) == [W]
        # released on probation: the very next failure quarantines again
        now += 5
        assert q.record_failure(W, "again", now)
        now -= 4  # so that "now + 4" above is the failure's time
    assert durations == [10, 20, 40, 80, 160, 320, 600, 600, 600]


def test_a_healthy_stretch_after_release_starts_afresh() -> None:
    q = Quarantine(P)
    fail_times(q, [0, 1, 2])
    assert q.handle_timer(12) == [W]
    # 600 s without a failure since the release: a single failure is a blip again
    assert not q.record_failure(W, "blip", 12 + 600)
    assert fail_times(q, [620, 630]) == [False, True]
    entry = q.entry(W, 631)
    assert entry is not None and entry.until == 640 and entry.level == 1


def test_failures_while_quarantined_do_not_count() -> None:
    q = Quarantine(P)
    fail_times(q, [0, 1, 2])
    assert not any(fail_times(q, [3, 5, 7, 9]))
    entry = q.entry(W, 9)
    assert entry is not None and entry.until == 12 and entry.reason == "failure at 2"


def test_peers_are_independent_and_released_in_order() -> None:
    q = Quarantine(P)
    a, b = "00000000000000aa", "00000000000000bb"
    fail_times(q, [0, 1, 2], b)
    fail_times(q, [0, 1, 2], a)
    assert q.quarantined(3) == {a, b}
    assert q.handle_timer(100) == [a, b]


def test_reasons_are_bounded_and_tracking_is_bounded() -> None:
    q = Quarantine(QuarantinePolicy(threshold=1, healthy_after=1))
    assert q.record_failure(W, "x" * 10_000, 0)
    entry = q.entry(W, 0)
    assert entry is not None and len(entry.reason) == 200
    for i in range(MAX_TRACKED + 10):
        q.record_failure(f"{i:016x}", "r", 0)
    assert len(q.quarantined(0)) <= MAX_TRACKED
    # once they are healthy again, room is made for new peers
    q.handle_timer(1000)
    assert q.record_failure("ffffffffffffffff", "r", 2000)


@given(st.lists(st.floats(0, 5000, allow_nan=False), max_size=40))
def test_quarantine_never_exceeds_the_cap_and_timers_advance(times: list[float]) -> None:
    q = Quarantine(P)
    for t in sorted(times):
        q.handle_timer(t)
        q.record_failure(W, "r", t)
        entry = q.entry(W, t)
        if entry is not None:
            assert 0 < entry.until - t <= P.cap + 1e-6
        timer = q.get_timer()
        assert timer is None or timer > t
