"""Every Redis key sdgate reads or writes, named once. Gateways and workers share one Redis (broker,
results, cache, counters), so a name spelled in two places is a bug waiting for a typo.

Per task (`<task_id>`, see celery_bridge/producer.py new_task_id):
- PROGRESS_CHANNEL: pub/sub channel of the worker's step events, subscribed by the gateways watching;
- PROGRESS_LAST: the latest step event, for a replica that asks later;
- WAITERS: sorted set of waiter ids scored by lease expiry (ms of Redis server time);
- WATCHED: set by the gateway that queued the task (a watched task with no live waiter expires);
- TASK_CANCEL: raised when the last waiter cancels; the worker stops at its next step.
Per cache key (the gateway's single flight across replicas): CLAIM names the task everyone waits
on; CLAIM_ALIVE is its owner's short heartbeat. Per job: JOB (the record), JOB_OWNER (the running
replica's lease), JOB_CANCEL (a DELETE that reached another replica). Per model: PRESENCE (live
workers), RENDER_MS (recent render times). IMAGE: the Redis image cache's default prefix. STATS:
the cluster-wide counters hash; MODEL_COUNTER is its per-model fields' prefix.
Celery's and kombu's own keys are taken from them, never spelled here.
"""

from __future__ import annotations

from kombu.transport.redis import Channel as _KombuRedisChannel

STATS = "sdgate:stats"
MODEL_COUNTER = "models:"  # a field of STATS: models:<model>:<counter>

PROGRESS_CHANNEL = "sdgate:progress:"
PROGRESS_LAST = "sdgate:progress-last:"
WAITERS = "sdgate:waiters:"
WATCHED = "sdgate:watched:"
TASK_CANCEL = "sdgate:cancel:"

CLAIM = "sdgate:claim:"
CLAIM_ALIVE = "sdgate:claim-alive:"

JOB = "sdgate:job:"
JOB_OWNER = "sdgate:job-owner:"
JOB_CANCEL = "sdgate:job-cancel:"

PRESENCE = "sdgate:workers:"
RENDER_MS = "sdgate:render-ms:"
IMAGE = "sdgate:img:"

TASK_ID = "sdgate-"  # not a key: every task id starts with it, so patterns can find sdgate's results
KOMBU_UNACKED = _KombuRedisChannel.unacked_key  # hash: delivery tag -> message a worker holds
KOMBU_UNACKED_INDEX = _KombuRedisChannel.unacked_index_key  # zset: delivery tag -> when it was last leased
