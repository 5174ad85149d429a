"""A task's broker message exactly as Celery would send it, built without sending it, so that fair
share's one script can queue a new task that may start now in the same round trip as its release
(celery_bridge/fair_share.py: FairShare.enqueue_and_release).

Celery's own `send_task` builds it, with kombu's serialisation, body encoding, delivery tag and
priority, on a kombu Redis channel whose last step is caught: `_put` (the LPUSH of the message)
and `_put_fanout` (the PUBLISH of its task-sent event, with task events on) hand back what they
would write instead of writing it. Those two and the key names (`_q_for_pri`,
`_get_publish_topics`) are kombu's private methods, used only here;
tests/integration/test_fair_share.py compares a built message with a sent one, so a kombu change
shows there.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from celery import Celery
from kombu import Producer
from kombu.utils.json import dumps

from celery_bridge.contract import TASK_NAME


@dataclass(frozen=True)
class TaskMessage:
    """What kombu would write to Redis to queue one task."""

    list_key: str  # the Redis list the task's queue is (kombu LPUSHes, the worker BRPOPs)
    body: str  # the message, as kombu encodes it for that list
    event: str = ""  # its task-sent event ("" with task events off), published on each of
    event_channels: Tuple[str, ...] = ()


class TaskMessages:
    """Builds TaskMessages with `app`'s settings; thread-safe (a channel per calling thread)."""

    def __init__(self, app: Celery):
        self.app = app
        self._local = threading.local()  # never closed by hand: a build in flight on another thread
        # must not find its connection gone (as Celery's own producer pool, they go with the object)

    def build(self, task_id: str, payload: Dict[str, Any], queue: str, expires_s: Optional[float]) -> TaskMessage:
        """The message `app.send_task` would queue for this task on `queue` now."""
        channel, caught = self._channel()
        caught.clear()
        self.app.send_task(TASK_NAME, args=[payload], task_id=task_id, queue=queue, expires=expires_s,
                           producer=Producer(channel))
        puts = [row for row in caught if row[0] == "put"]
        if len(puts) != 1:
            raise RuntimeError(f"kombu wrote {len(puts)} messages for one task; celery_bridge/task_message.py "
                               "needs a look at this kombu version")
        _, list_queue, message = puts[0]
        if channel._expires.get(list_queue):
            raise RuntimeError(f"queue {list_queue!r} has an expiry, which kombu sets beside each message; "
                               "celery_bridge/task_message.py does not")
        built: Dict[str, Any] = {
            "list_key": channel._q_for_pri(list_queue, channel._get_message_priority(message, reverse=False)),
            "body": dumps(message)}
        for row in caught:
            if row[0] == "fanout":
                _, exchange, routing_key, event = row
                built.update(event=dumps(event), event_channels=tuple(channel._get_publish_topics(exchange, routing_key)))
        return TaskMessage(**built)

    def _channel(self) -> Tuple[Any, List[tuple]]:
        channel = getattr(self._local, "channel", None)
        if channel is None:
            caught: List[tuple] = []
            channel = self.app.connection_for_write().channel()
            channel._put = lambda queue, message, **_: caught.append(("put", queue, message))
            channel._put_fanout = lambda exchange, message, routing_key, **_: caught.append(
                ("fanout", exchange, routing_key, message))
            self._local.channel, self._local.caught = channel, caught
        return channel, self._local.caught
