"""lifecycle.RECORD_SCRIPT on a real Redis: one ordered writer per record, whoever writes last."""

from __future__ import annotations

import json
import uuid

import pytest
import redis

from celery_bridge.lifecycle import RECORD_SCRIPT

pytestmark = pytest.mark.integration


def test_a_record_only_moves_forward(redis_server):
    client = redis.Redis(port=redis_server.port)
    save = client.register_script(RECORD_SCRIPT)
    key = f"sdgate:job:job-{uuid.uuid4().hex}"

    def write(seq: int, state: str) -> int:
        return save(keys=[key], args=[json.dumps({"seq": seq, "state": state}), 60])

    assert write(1, "queued") == 1
    assert write(3, "generating") == 1
    assert write(2, "queued") == 0  # a stale snapshot landing late
    assert write(4, "done") == 1
    assert write(5, "generating") == 0  # a late progress event after the end
    assert write(6, "cancelled") == 0  # an end is final, even a newer one
    assert json.loads(client.get(key)) == {"seq": 4, "state": "done"}
    assert 0 < client.ttl(key) <= 60
