"""Lua scripts in pipelines (celery_bridge/lua.py), on a real Redis: no SCRIPT EXISTS round trip
before a pipeline runs, and a flushed script cache breaks neither a pipeline nor a direct call."""

from __future__ import annotations

import uuid

import pytest
import redis

from celery_bridge import lua, redis_keys
from celery_bridge.fair_share import FairShare
from celery_bridge.progress import add_waiters

pytestmark = pytest.mark.integration
COUNT = "return redis.call('INCR', KEYS[1])"


def script_commands(client: redis.Redis) -> int:
    """SCRIPT subcommands served so far (Redis 7 counts `script|exists` apart; 6 counts `script`)."""
    return sum(stats["calls"] for name, stats in client.info("commandstats").items()
               if name in ("cmdstat_script", "cmdstat_script|exists", "cmdstat_script|load"))


@pytest.fixture
def client(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def test_a_pipeline_holding_scripts_costs_no_script_exists_round_trip(client):
    """The worker's result store (fair share's `finished` riding with it) and the lease keeper queue
    scripts on pipelines: redis-py would send SCRIPT EXISTS before each such execute()."""
    fair, task = FairShare(client), "t-" + uuid.uuid4().hex
    add_waiters(client, task, ["w1"], 5.0)  # a direct call first: EVALSHA, the script loaded if need be
    before = script_commands(client)
    for _ in range(3):
        pipe = client.pipeline(transaction=False)
        fair.finished("q-" + uuid.uuid4().hex[:6], "alice", task, 12.0, pipe=pipe)
        add_waiters(client, task, ["w2"], 5.0, pipe=pipe, renew=False)
        pipe.set("after-" + task, 1)
        pipe.execute()
    assert script_commands(client) == before
    assert client.zscore(redis_keys.WAITERS + task, "w2") is not None, "the pipelined script ran"


def test_a_flushed_script_cache_breaks_neither_a_pipeline_nor_a_direct_call(client):
    counter = "n-" + uuid.uuid4().hex
    script = client.register_script(COUNT)
    assert lua.call(script, [counter]) == 1
    for transaction in (False, True):
        client.script_flush()
        pipe = client.pipeline(transaction=transaction)
        for _ in range(3):
            lua.call(script, [counter], client=pipe)
        assert [args[0] for args, _ in pipe.command_stack] == ["EVAL", "EVALSHA", "EVALSHA"], \
            "the source goes once a batch"
        replies = pipe.execute()  # the EVAL runs first and caches the script for the EVALSHAs after it
        assert replies == [replies[0], replies[0] + 1, replies[0] + 2]
        lua.call(script, [counter], client=pipe)
        assert [args[0] for args, _ in pipe.command_stack] == ["EVAL"], "a new batch sends it whole again"
        pipe.reset()
    client.script_flush()
    assert lua.call(script, [counter]) == 8  # EVALSHA, reloaded on NOSCRIPT
