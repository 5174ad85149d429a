"""The transition table of a generation (celery_bridge/lifecycle.py): every forbidden move is
refused, and an end state is final. The same table in Redis: tests/integration/test_lifecycle.py."""

from __future__ import annotations

import itertools

import pytest

from celery_bridge.lifecycle import ALLOWED, TERMINAL, IllegalTransition, State, advance, ended
from client import protocol
from client.protocol import GenerationRequest, ProtocolError
from serve_app.flight import Answer, Flight

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


def test_an_outcome_ends_in_its_state():
    assert ended(None) is State.DONE
    assert ended(protocol.E_CANCELLED) is State.CANCELLED
    assert ended(protocol.E_TIMEOUT) is State.FAILED and ended(protocol.E_INTERNAL) is State.FAILED


def test_a_flight_moves_through_the_table_and_a_late_start_never_moves_it_back():
    flight = Flight("k" * 64, GenerationRequest("a flight"))
    heard = []
    flight.on_started(lambda: heard.append("generating"))
    assert flight.state is State.QUEUED
    flight.mark_started()
    flight.mark_started()  # a second start event (a redelivery's) is heard once
    assert flight.state is State.GENERATING and heard == ["generating"]
    assert flight.finish(Answer({}, b"png", cached=False))
    assert flight.state is State.DONE
    flight.mark_started()  # a start event that arrives after the image
    flight.on_started(lambda: heard.append("late"))
    assert flight.state is State.DONE and heard == ["generating"]
    assert not flight.finish(ProtocolError(protocol.E_TIMEOUT, "too late")) and flight.state is State.DONE


@pytest.mark.parametrize("outcome,state", [(ProtocolError(protocol.E_CANCELLED, "cancelled"), State.CANCELLED),
                                           (ProtocolError(protocol.E_BUSY, "busy"), State.FAILED),
                                           (RuntimeError("broken"), State.FAILED)])
def test_a_queued_flight_that_fails_ends_failed_or_cancelled_and_a_late_start_is_ignored(outcome, state):
    flight = Flight("k" * 64, GenerationRequest("a failing flight"))
    flight.finish(outcome)
    flight.mark_started()
    assert flight.state is state
    with pytest.raises(type(outcome)):
        flight.future.result()
