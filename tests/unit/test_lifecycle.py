"""The transition table of a generation (celery_bridge/lifecycle.py): every forbidden move is
refused, and an end state is final. The same table in Redis: tests/integration/test_lifecycle.py."""

from __future__ import annotations

import itertools

import pytest

from celery_bridge.lifecycle import ALLOWED, TERMINAL, IllegalTransition, State, advance

FORWARD = {
    (State.QUEUED, State.QUEUED), (State.QUEUED, State.GENERATING), (State.QUEUED, State.EXPIRED),
    (State.QUEUED, State.DONE), (State.QUEUED, State.FAILED), (State.QUEUED, State.CANCELLED),
    (State.GENERATING, State.GENERATING), (State.GENERATING, State.DONE), (State.GENERATING, State.FAILED),
    (State.GENERATING, State.CANCELLED),
}


@pytest.mark.parametrize("current,new", sorted(itertools.product(State, State)))
def test_every_move_is_allowed_exactly_when_it_goes_forward(current, new):
    if (current, new) in FORWARD:
        assert advance(current, new) is new
    else:
        with pytest.raises(IllegalTransition, match=f"from {current.value} to {new.value}"):
            advance(current, new)


def test_the_ends_are_final_and_only_a_queued_generation_expires():
    assert TERMINAL == {State.DONE, State.FAILED, State.CANCELLED, State.EXPIRED}
    assert all(state.terminal == (state in TERMINAL) for state in State)
    assert [state for state in State if State.EXPIRED in ALLOWED[state]] == [State.QUEUED]


def test_the_states_are_the_wires_words():
    from client import protocol

    assert State.QUEUED.value == protocol.STATUS_QUEUED and State.GENERATING.value == protocol.STATUS_GENERATING
