"""Lua scripts, called the one way that costs a single round trip whether or not a pipeline holds them.

A redis-py `Script` called with `client=pipe` makes the pipeline send SCRIPT EXISTS for it, in a round
trip of its own, before every execute(). `call` queues the script's first call on a pipeline as EVAL
with its source instead, and any later call of it in the same batch as EVALSHA: the EVAL, run first,
leaves it in Redis's script cache. So no batch depends on what a restart or SCRIPT FLUSH may have
dropped (EVALSHA's NOSCRIPT, which no single command in a pipeline could recover from), and a keeper's
batch of a thousand renewals carries the source once. Outside a pipeline the `Script` itself runs
(EVALSHA, loaded again on NOSCRIPT).
"""

from __future__ import annotations

from typing import Any, Sequence

import redis
from redis.commands.core import Script


def call(script: Script, keys: Sequence[Any] = (), args: Sequence[Any] = (), client: Any = None) -> Any:
    """Run `script` on `client` (its own client when None); on a pipeline, queue it and return the pipeline."""
    if not isinstance(client, redis.client.Pipeline):
        return script(keys=list(keys), args=list(args), client=client)
    # The scripts sent whole in the batch being queued (execute() starts a new command_stack).
    batch, sent = getattr(client, "_sdgate_lua_sent", (None, set()))
    if batch is not client.command_stack:
        sent = set()
        client._sdgate_lua_sent = (client.command_stack, sent)
    if script.sha in sent:
        return client.evalsha(script.sha, len(keys), *keys, *args)
    sent.add(script.sha)
    return client.eval(script.script, len(keys), *keys, *args)
