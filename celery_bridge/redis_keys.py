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
LISTENER_WAKE_CHANNEL = "sdgate:listener-wake:"  # per gateway process: a new watch wakes its result listener
PROGRESS_LAST = "sdgate:progress-last:"
WAITERS = "sdgate:waiters:"
WATCHED = "sdgate:watched:"
TASK_CANCEL = "sdgate:cancel:"

CLAIM = "sdgate:claim:"
CLAIM_ALIVE = "sdgate:claim-alive:"

JOB = "sdgate:job:"
JOB_OWNER = "sdgate:job-owner:"
JOB_CANCEL = "sdgate:job-cancel:"
JOB_IMAGES = "sdgate:job-images:"  # hash: init_image, mask of a job (its record names them by sha256)

PRESENCE = "sdgate:workers:"
WORKER_SLOTS = "sdgate:worker-slots:"  # per model: hash worker -> tasks it holds at once
WORKER_BATCHING = "sdgate:worker-batching:"  # per model: hash worker -> solo | window | continuous

# Fair share (celery_bridge/fair_share.py). Per model queue: FAIR_TENANTS (tenants that ever queued),
# FAIR_BACKLOG<queue>:<tenant> (task ids, oldest first), FAIR_QUEUED (every tenant's held task ids),
# FAIR_VTIME (tenant -> virtual time), FAIR_CLOCK (the queue's virtual clock), FAIR_OUT (released and
# unfinished task ids, scored by expiry). Across models: FAIR_HELD (task id -> what to send),
# FAIR_SENDING (released, send not yet confirmed, scored by lease expiry), FAIR_WAKE (wake-ups for
# the dispatchers). Per tenant: TENANT_OUT (its released, unfinished task ids).
FAIR_TENANTS = "sdgate:fair-tenants:"
FAIR_BACKLOG = "sdgate:fair-backlog:"
FAIR_QUEUED = "sdgate:fair-queued:"
FAIR_VTIME = "sdgate:fair-vtime:"
FAIR_CLOCK = "sdgate:fair-clock:"
FAIR_OUT = "sdgate:fair-out:"
FAIR_HELD = "sdgate:fair-held"
FAIR_SENDING = "sdgate:fair-sending"
FAIR_WAKE = "sdgate:fair-wake"
TENANT_OUT = "sdgate:tenant-out:"

# Tenants (serve_app/tenants.py): TENANT (record: weight, limits), TENANT_KEYS (sha256 of a key ->
# tenant), TENANT_KEY_IDS (per tenant: its key hashes), TENANT_RATE (per tenant and second: requests),
# TENANT_WAITING (per tenant: its waiters on misses, scored by lease expiry), TENANT_GALLERY (per
# tenant: cache keys it asked for, scored by time). TENANT_COUNTER: the prefix of
# per-tenant fields in STATS.
TENANT = "sdgate:tenant:"
TENANTS = "sdgate:tenants"
TENANT_KEYS = "sdgate:tenant-keys"
TENANT_KEY_IDS = "sdgate:tenant-key-ids:"
TENANT_RATE = "sdgate:tenant-rate:"
TENANT_WAITING = "sdgate:tenant-waiting:"
TENANT_GALLERY = "sdgate:tenant-gallery:"
TENANT_COUNTER = "tenants:"  # a field of STATS: tenants:<tenant>:<counter>
RENDER_MS = "sdgate:render-ms:"
# The A1111 API (serve_app/a1111_api.py) and signed image URLs (serve_app/signed_urls.py).
URL_SECRET = "sdgate:url-secret"  # the HMAC key of signed image URLs, made once, shared by every replica
A1111_OPTIONS = "sdgate:a1111-options:"  # per caller: hash of its /sdapi/v1/options (sd_model_checkpoint)
A1111_WORK = "sdgate:a1111-work:"  # per caller: hash waiter -> its progress (JSON), what /progress reads
A1111_INTERRUPT = "sdgate:a1111-interrupt:"  # per waiter: /interrupt reached another replica than its own
IMAGE = "sdgate:img:"

TASK_ID = "sdgate-"  # not a key: every task id starts with it, so patterns can find sdgate's results
KOMBU_UNACKED = _KombuRedisChannel.unacked_key  # hash: delivery tag -> message a worker holds
KOMBU_UNACKED_INDEX = _KombuRedisChannel.unacked_index_key  # zset: delivery tag -> when it was last leased
