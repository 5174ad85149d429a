"""Lua scripts, called the one way that costs a single round trip whether or not a pipeline holds them.

A redis-py `Script` called with `client=pipe` makes the pipeline send SCRIPT EXISTS for it, in a round
trip of its own, before every execute(). `call` queues EVAL with the script's source on a pipeline
instead: Redis hashes the body and reuses the compiled script it caches under that hash, and EVAL
never answers NOSCRIPT (EVALSHA does once a restart or SCRIPT FLUSH dropped the script, which no
single command in a pipeline could then recover from). Outside a pipeline the `Script` itself runs
(EVALSHA, loaded again on NOSCRIPT): a few bytes instead of the source.
"""

from __future__ import annotations

from typing import Any, Sequence

import redis
from redis.commands.core import Script


def call(script: Script, keys: Sequence[Any] = (), args: Sequence[Any] = (), client: Any = None) -> Any:
    """Run `script` on `client` (its own client when None); on a pipeline, queue it and return the pipeline."""
    if isinstance(client, redis.client.Pipeline):
        return client.eval(script.script, len(keys), *keys, *args)
    return script(keys=list(keys), args=list(args), client=client)
