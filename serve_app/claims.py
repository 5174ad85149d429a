"""Cluster claims: one task per cache key across every gateway replica.

A claim is two keys, set by one Lua script: the claim (redis_keys.CLAIM), which names the task
for as long as a flight may live, so a request arriving after its claimer died still joins the
running task; and the claimer's heartbeat (redis_keys.CLAIM_ALIVE), a short lease it renews while
its flight lives. Joiners take over a claim whose heartbeat lapsed (its replica died). Every
expiry is Redis's own (EX/PX): no host's clock is read.
"""

from __future__ import annotations

import logging
from typing import Any, List, Sequence, Tuple

import redis

from celery_bridge import lua, progress, redis_keys
from celery_bridge.producer import new_task_id
from serve_app.config import GatewayConfig
from serve_app.flight import Flight

log = logging.getLogger(__name__)

# KEYS[1] claim, KEYS[2] heartbeat. ARGV: task id, heartbeat ms, claim s, waiter lease ms, per-task
# ttl s, waiters key prefix, watched key prefix, then the waiter ids to lease on the task that holds
# the claim (celery_bridge/progress.py's lease_waiters), in the same round trip.
# Returns {1, id} when we won (the task is marked watched: we queue it), else {0, the id that holds
# it}; {0, nil} when the claim lapsed between the two looks (the caller tries again).
_CLAIM = progress.LEASE_WAITERS_FN + """
local won, holder = 0, ARGV[1]
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[3]) then
  redis.call('set', KEYS[2], ARGV[1], 'PX', ARGV[2])
  won = 1
else
  holder = redis.call('get', KEYS[1])
  if not holder then return {0, false} end
end
local watched = nil
if won == 1 then watched = ARGV[7] .. holder end
lease_waiters(ARGV[6] .. holder, watched, tonumber(ARGV[4]), ARGV[5], 8, false)
return {won, holder}
"""
# Renew (or, with the heartbeat lapsed, take over) the claim for task ARGV[1]: 1 if it is ours now.
_RENEW_CLAIM = """
local current = redis.call('get', KEYS[1])
if current and current ~= ARGV[1] then return 0 end
if ARGV[4] == 'takeover' and redis.call('exists', KEYS[2]) == 1 then return 0 end
redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('set', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
"""
# Deletes the claim only if it still names our task, so a late finisher never frees a newer claim.
_RELEASE_CLAIM = """
if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[2]) return redis.call('del', KEYS[1]) end
return 0
"""


class ClusterClaims:
    """Claims, renewals and take-overs of cache keys for one replica."""

    def __init__(self, client: redis.Redis, config: GatewayConfig):
        self.config = config
        self._redis = client
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW_CLAIM)
        self._release = client.register_script(_RELEASE_CLAIM)

    @staticmethod
    def _keys(key: str) -> List[str]:
        return [redis_keys.CLAIM + key, redis_keys.CLAIM_ALIVE + key]

    def _args(self, task_id: str, *extra: str) -> list:
        return [task_id, int(self.config.claim_lease_s * 1000), int(self.config.flight_timeout_s) + 1, *extra]

    def claim(self, key: str, waiter_ids: Sequence[str] = (), waiter_lease_s: float = 0.0) -> Tuple[str, bool]:
        """(the task id that renders `key`, whether we won the claim), with `waiter_ids` leased on that
        task for `waiter_lease_s` in the same round trip (and the task marked watched when we won);
        RedisError when unreachable."""
        args = [int(waiter_lease_s * 1000), progress.TASK_TTL_S, redis_keys.WAITERS, redis_keys.WATCHED, *waiter_ids]
        for _ in range(5):
            task_id = new_task_id(key)
            won, holder = self._claim(keys=self._keys(key), args=self._args(task_id) + args)
            if holder is not None:
                return (holder.decode() if isinstance(holder, bytes) else holder), bool(won)
        raise redis.RedisError("the claim for this key kept changing hands")

    def release(self, key: str, task_id: str) -> None:
        """Free `key`'s claim if it still names `task_id`; best effort (it expires by itself)."""
        try:
            self._release(keys=self._keys(key), args=[task_id])
        except redis.RedisError as exc:
            log.warning("could not release claim %s (%s); it expires by itself", key[:12], exc)

    def renew(self, flights: Sequence[Flight], pipe: Any) -> List[Flight]:
        """One round for live `flights`: renew the claims this replica owns (a lost one is no longer
        ours), and return the others whose claimer stopped renewing (candidates for take_over)."""
        for flight in flights:
            if flight.owner:
                lua.call(self._renew, self._keys(flight.key), self._args(flight.task_id, "renew"), pipe)
            else:
                pipe.exists(redis_keys.CLAIM_ALIVE + flight.key)
        lapsed = []
        for flight, reply in zip(flights, pipe.execute()):
            if flight.owner and not reply:
                log.warning("claim for %s is held by another task now", flight.key[:12])
                flight.owner = False
            elif not flight.owner and not reply and not flight.future.done():
                lapsed.append(flight)
        return lapsed

    def take_over(self, flight: Flight) -> bool:
        """Claim `flight`'s task whose claimer died; False when another replica did first, or the
        key has a newer task (we keep waiting on ours)."""
        if not self._renew(keys=self._keys(flight.key), args=self._args(flight.task_id, "takeover")):
            return False
        flight.owner = True
        return True
