"""The filled task message's argument repr is Celery's own (celery_bridge/task_message.py)."""

from celery.utils.saferepr import saferepr
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_bridge.task_message import flat_argsrepr

MAXSIZE, MAXLEVELS = 1024, 3  # Celery's argsrepr_maxsize and task_repr_maxlevels defaults
values = st.one_of(st.text(), st.integers(), st.floats(allow_nan=True), st.booleans(), st.none())


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=20), values, max_size=12))
def test_a_flat_payloads_repr_is_the_one_saferepr_gives(payload):
    ours = flat_argsrepr(payload, MAXSIZE, MAXLEVELS)
    if ours is not None:
        assert ours == saferepr([payload], MAXSIZE, maxlevels=MAXLEVELS)


@given(st.integers(min_value=MAXSIZE - 40, max_value=MAXSIZE + 40))
def test_a_repr_near_the_size_limit_is_left_to_saferepr_when_it_would_be_cut(length):
    payload = {"prompt": "it's a fox\nin the 'snow' " * 80}
    payload["prompt"] = payload["prompt"][:length]
    ours = flat_argsrepr(payload, MAXSIZE, MAXLEVELS)
    real = saferepr([payload], MAXSIZE, maxlevels=MAXLEVELS)
    assert ours is None or ours == real
    if ours is None:
        assert len(f"[{{'prompt': '{payload['prompt']}'}}]") >= MAXSIZE - 40


def test_nested_values_or_shallow_levels_are_left_to_saferepr():
    assert flat_argsrepr({"loras": [{"name": "x"}]}, MAXSIZE, MAXLEVELS) is None
    assert flat_argsrepr({1: "x"}, MAXSIZE, MAXLEVELS) is None
    assert flat_argsrepr({"prompt": "x"}, MAXSIZE, 1) is None
    assert flat_argsrepr({"prompt": "it's"}, MAXSIZE, MAXLEVELS) == "[{'prompt': 'it\\'s'}]"
