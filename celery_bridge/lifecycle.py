"""The states of a generation and the moves between them, in one place.

A generation is `queued` until a worker starts it (`generating`), and ends exactly once: `done`,
`failed`, `cancelled` (its last waiter cancelled), or `expired` (every waiter left before it
started). The values are the wire's own words (client/protocol.py's STATUS states, the jobs API).
Every record that stores a state is written through `advance` here, or through RECORD_SCRIPT in
Redis, which applies the same table, so nothing moves a generation backwards: a late progress event
never turns a done job back into a generating one, whichever replica or thread writes it last.
A gateway's flight (serve_app/flight.py) and a job (serve_app/jobs.py) move only through
`advance`; `ended` names the end state an outcome reaches.
"""

from __future__ import annotations

import enum
from typing import Dict, FrozenSet, Optional

from client.protocol import E_CANCELLED


class State(str, enum.Enum):
    """Where a generation is; the value is what the wire and the jobs API say."""

    QUEUED = "queued"
    GENERATING = "generating"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return not ALLOWED[self]


_ENDS = frozenset({State.DONE, State.FAILED, State.CANCELLED})
# state -> the states it may move to (staying put counts: progress within a state is a save too).
ALLOWED: Dict[State, FrozenSet[State]] = {
    State.QUEUED: frozenset({State.QUEUED, State.GENERATING, State.EXPIRED}) | _ENDS,
    State.GENERATING: frozenset({State.GENERATING}) | _ENDS,
    State.DONE: frozenset(),
    State.FAILED: frozenset(),
    State.CANCELLED: frozenset(),
    State.EXPIRED: frozenset(),
}
TERMINAL = frozenset(state for state, nexts in ALLOWED.items() if not nexts)


class IllegalTransition(ValueError):
    """A move the table does not allow (from an end state, or back to an earlier one)."""


def advance(current: State, new: State) -> State:
    """`new` when `current` may move there; IllegalTransition otherwise."""
    if new not in ALLOWED[current]:
        raise IllegalTransition(f"a generation cannot go from {current.value} to {new.value}")
    return new


def ended(error_code: Optional[str]) -> State:
    """The end state of a generation whose outcome carries `error_code`; None: it has its image."""
    if error_code is None:
        return State.DONE
    return State.CANCELLED if error_code == E_CANCELLED else State.FAILED


def _lua_table() -> str:
    rows = ", ".join(f"{state.value} = {{{', '.join(f'{n.value} = true' for n in sorted(nexts))}}}"
                     for state, nexts in ALLOWED.items())
    return "{" + rows + "}"


# One ordered writer for a JSON record with `state` and `seq` fields. KEYS[1] record. ARGV: the
# new JSON, ttl s. Writes it only when its seq is above the stored one and the table allows the
# move; returns 1 when written, 0 when refused (a stale or backward write: the stored one stands).
RECORD_SCRIPT = f"""
local allowed = {_lua_table()}
local new = cjson.decode(ARGV[1])
local raw = redis.call('get', KEYS[1])
if raw then
  local old = cjson.decode(raw)
  if (tonumber(new.seq) or 0) <= (tonumber(old.seq) or 0) then return 0 end
  local moves = allowed[old.state]
  if moves == nil or not moves[new.state] then return 0 end
end
redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""
