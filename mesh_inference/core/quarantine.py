"""Which peers keep failing, and for how long they are left out of plans. Sans-I/O.

Public API::

    q = Quarantine(QuarantinePolicy(threshold=3, window=60, base=10, cap=600, healthy_after=600))
    q.record_failure(peer_id, reason, now) -> bool   # True: the peer has just been quarantined
    q.is_quarantined(peer_id, now) -> bool
    q.quarantined(now) -> frozenset[str]
    q.entry(peer_id, now) -> QuarantineEntry | None  # reason, until (same clock as now)
    q.get_timer() -> float | None; q.handle_timer(now) -> list[str]   # the peers released

A failure is anything the host saw go wrong with a worker: its rpc-server went
down while it served in the plan, a tunnel to it could not be opened, the
host's llama-server crashed naming its endpoint, its connection died or
broke the protocol. One incident often shows up as several reports (the
tunnel fails, then the engine crashes): reports closer than
``incident_gap`` to the previous one count once.

A peer that fails ``threshold`` times within ``window`` seconds is
quarantined for ``base`` seconds. Once released it is on probation: its next
failure quarantines it again at once, for twice as long as the last time
(capped at ``cap``). A peer that goes ``healthy_after`` seconds without a
failure (counted from its release, or its last failure) starts afresh.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

__all__ = ["MAX_TRACKED", "Quarantine", "QuarantineEntry", "QuarantinePolicy"]

# Peers are authenticated members of a small mesh; a bound anyway.
MAX_TRACKED = 1024
MAX_REASON = 200


@dataclass(frozen=True, slots=True)
class QuarantinePolicy:
    threshold: int = 3
    window: float = 60.0
    base: float = 10.0
    cap: float = 600.0
    healthy_after: float = 600.0
    incident_gap: float = 1.0

    def __post_init__(self) -> None:
        if self.threshold < 1:
            raise ValueError("threshold must be at least 1")
        for name in ("window", "base", "cap", "healthy_after"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.incident_gap < 0:
            raise ValueError("incident_gap must not be negative")
        if self.cap < self.base:
            raise ValueError("cap must be at least base")


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    reason: str
    until: float  # same clock as ``now``
    level: int  # 1 for the first quarantine, 2 for the next (twice as long) …


@dataclass(slots=True)
class _Record:
    failures: deque[float] = field(default_factory=deque)
    last_failure: float | None = None
    level: int = 0  # quarantines since the last fresh start
    until: float | None = None
    released: float | None = None
    reason: str = ""


class Quarantine:
    def __init__(self, policy: QuarantinePolicy | None = None) -> None:
        self.policy = policy if policy is not None else QuarantinePolicy()
        self._records: dict[str, _Record] = {}

    # ------------------------------------------------------------ input
    def record_failure(self, peer_id: str, reason: str, now: float) -> bool:
        """Count one failure of ``peer_id``; True if it puts the peer in quarantine now."""
        p = self.policy
        r = self._records.get(peer_id)
        if r is None:
            if len(self._records) >= MAX_TRACKED:
                self._forget_healthy(now)
                if len(self._records) >= MAX_TRACKED:
                    return False
            r = self._records[peer_id] = _Record()
        if r.until is not None:
            return False  # already out of every plan: nothing it does counts
        if r.last_failure is not None and now - r.last_failure < p.incident_gap:
            return False  # the same incident, reported again
        if self._healthy_since(r, now):
            r.level, r.released = 0, None
            r.failures.clear()
        r.last_failure = now
        r.failures.append(now)
        while r.failures and r.failures[0] <= now - p.window:
            r.failures.popleft()
        if r.level == 0 and len(r.failures) < p.threshold:
            return False
        r.until = now + min(p.cap, p.base * 2.0 ** min(r.level, 64))
        r.level += 1
        r.reason = reason[:MAX_REASON]
        r.failures.clear()
        return True

    # ------------------------------------------------------------ queries
    def is_quarantined(self, peer_id: str, now: float) -> bool:
        r = self._records.get(peer_id)
        return r is not None and r.until is not None and now < r.until

    def quarantined(self, now: float) -> frozenset[str]:
        return frozenset(pid for pid in self._records if self.is_quarantined(pid, now))

    def entry(self, peer_id: str, now: float) -> QuarantineEntry | None:
        r = self._records.get(peer_id)
        if r is None or r.until is None or now >= r.until:
            return None
        return QuarantineEntry(r.reason, r.until, r.level)

    def failures(self, peer_id: str) -> int:
        """Failures counted toward the next quarantine (for tests and logs)."""
        r = self._records.get(peer_id)
        return 0 if r is None else len(r.failures)

    # ------------------------------------------------------------ timers
    def get_timer(self) -> float | None:
        """The next release (absolute, same clock as ``now``), if any peer is quarantined."""
        return min((r.until for r in self._records.values() if r.until is not None), default=None)

    def handle_timer(self, now: float) -> list[str]:
        """Release every peer whose time is up; returns them (sorted) so the caller re-plans."""
        released = []
        for pid in sorted(self._records):
            r = self._records[pid]
            if r.until is not None and now >= r.until:
                r.until, r.released = None, now
                released.append(pid)
        return released

    # ------------------------------------------------------------ internals
    def _healthy_since(self, r: _Record, now: float) -> bool:
        last = max(x for x in (r.last_failure, r.released, float("-inf")) if x is not None)
        return now - last >= self.policy.healthy_after

    def _forget_healthy(self, now: float) -> None:
        for pid in [pid for pid, r in self._records.items()
                    if r.until is None and self._healthy_since(r, now)]:  # fmt: skip
            del self._records[pid]
