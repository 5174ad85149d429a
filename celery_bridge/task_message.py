"""A task's broker message exactly as Celery would send it, built without sending it, so that fair
share's one script can queue a new task that may start now in the same round trip as its release
(celery_bridge/fair_share.py: FairShare.enqueue_and_release).

The first message of each queue (per thread) is built by Celery's own `send_task`, with kombu's
serialisation, body encoding, delivery tag and priority, on a kombu Redis channel whose last step
is caught: `_put` (the LPUSH of the message) and `_put_fanout` (the PUBLISH of its task-sent
event, with task events on) hand back what they would write instead of writing it. That message
is then the template of the queue's later ones: only what Celery sets per send is filled in (the
task id, the arguments and their repr, the expiry, the delivery tags, the event's clock and
timestamp): 0.10 ms a message instead of 0.53 in a quiet process. Those two kombu methods and the
key names (`_q_for_pri`, `_get_publish_topics`) are kombu's private methods, used only here;
tests/integration/test_fair_share.py compares a built message, the first and a filled one, with a
sent one, so a kombu or Celery change shows there.
"""

from __future__ import annotations

import copy
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from numbers import Number
from typing import Any, Dict, List, Optional, Tuple

from celery import Celery
from celery.utils.saferepr import saferepr
from kombu import Producer
from kombu.utils.json import dumps, loads

from celery_bridge.contract import TASK_NAME


@dataclass(frozen=True)
class TaskMessage:
    """What kombu would write to Redis to queue one task."""

    list_key: str  # the Redis list the task's queue is (kombu LPUSHes, the worker BRPOPs)
    body: str  # the message, as kombu encodes it for that list
    event: str = ""  # its task-sent event ("" with task events off), published on each of
    event_channels: Tuple[str, ...] = ()


class TaskMessages:
    """Builds TaskMessages with `app`'s settings; thread-safe (a channel and templates per calling
    thread, as Celery's own reply_to is per thread)."""

    def __init__(self, app: Celery):
        self.app = app
        self._local = threading.local()  # never closed by hand: a build in flight on another thread
        # must not find its connection gone (as Celery's own producer pool, they go with the object)

    def build(self, task_id: str, payload: Dict[str, Any], queue: str, expires_s: Optional[float]) -> TaskMessage:
        """The message `app.send_task` would queue for this task on `queue` now."""
        channel, caught, templates = self._thread_state()
        template = templates.get((queue, expires_s))
        if template is not None:
            return template.fill(task_id, payload)
        built, message, event = self._sent_by_celery(channel, caught, task_id, payload, queue, expires_s)
        templates[(queue, expires_s)] = _Template(self.app, channel.codecs, built, message, event, expires_s)
        return built

    def _sent_by_celery(self, channel: Any, caught: List[tuple], task_id: str, payload: Dict[str, Any], queue: str,
                        expires_s: Optional[float]) -> Tuple[TaskMessage, Dict[str, Any], Optional[Dict[str, Any]]]:
        """What send_task writes on this thread's catching `channel`: the TaskMessage, the message and
        its task-sent event."""
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
        event = None
        for row in caught:
            if row[0] == "fanout":
                _, exchange, routing_key, event = row
                built.update(event=dumps(event), event_channels=tuple(channel._get_publish_topics(exchange, routing_key)))
        return TaskMessage(**built), message, event

    def _thread_state(self) -> Tuple[Any, List[tuple], Dict[Tuple[str, Optional[float]], "_Template"]]:
        channel = getattr(self._local, "channel", None)
        if channel is None:
            caught: List[tuple] = []
            channel = self.app.connection_for_write().channel()
            channel._put = lambda queue, message, **_: caught.append(("put", queue, message))
            channel._put_fanout = lambda exchange, message, routing_key, **_: caught.append(
                ("fanout", exchange, routing_key, message))
            self._local.channel, self._local.caught, self._local.templates = channel, caught, {}
        return channel, self._local.caught, self._local.templates


class _Template:
    """One queue's message as Celery built it, refilled for each later task. Bodies are encoded
    with the kombu codec each message names (`body_encoding`), as kombu encoded the template's."""

    def __init__(self, app: Celery, codecs: Dict[str, Any], built: TaskMessage, message: Dict[str, Any],
                 event: Optional[Dict[str, Any]], expires_s: Optional[float]):
        self.app, self.built, self.expires_s = app, built, expires_s
        self.message = copy.deepcopy(message)
        self.codec = codecs[message["properties"]["body_encoding"]]
        self.message_extra = loads(self.codec.decode(message["body"]))[1:]  # kwargs and embed, as sent
        self.event = copy.deepcopy(event) if event is not None else None
        self.event_codec = codecs[event["properties"]["body_encoding"]] if event is not None else None
        self.event_fields = loads(self.event_codec.decode(event["body"])) if event is not None else None
        self.repr_maxsize = app.amqp.argsrepr_maxsize
        self.repr_maxlevels = app.conf.task_repr_maxlevels

    def fill(self, task_id: str, payload: Dict[str, Any]) -> TaskMessage:
        args = [payload]
        argsrepr = flat_argsrepr(payload, self.repr_maxsize, self.repr_maxlevels)
        if argsrepr is None:
            argsrepr = saferepr(args, self.repr_maxsize, maxlevels=self.repr_maxlevels)
        expires = (self.app.now() + timedelta(seconds=self.expires_s)).isoformat() if self.expires_s is not None else None

        message = dict(self.message)
        message["headers"] = dict(message["headers"], id=task_id, root_id=task_id, expires=expires, argsrepr=argsrepr)
        message["properties"] = dict(message["properties"], correlation_id=task_id, delivery_tag=str(uuid.uuid4()))
        message["body"] = self.codec.encode(dumps([args, *self.message_extra]))
        event = ""
        if self.event is not None:
            fields = dict(self.event_fields, uuid=task_id, root_id=task_id, args=argsrepr, expires=expires,
                          clock=self.app.clock.forward(), timestamp=time.time())
            envelope = dict(self.event, body=self.event_codec.encode(dumps(fields)))
            envelope["properties"] = dict(envelope["properties"], delivery_tag=str(uuid.uuid4()))
            event = dumps(envelope)
        return TaskMessage(self.built.list_key, dumps(message), event, self.built.event_channels)


def flat_argsrepr(payload: Any, maxsize: Optional[int], maxlevels: Optional[int]) -> Optional[str]:
    """What Celery's saferepr gives for `[payload]`, for a flat dict of str keys and str, number,
    bool or None values short enough that nothing is truncated; None for anything else."""
    if not isinstance(payload, dict) or (maxlevels and maxlevels < 2):
        return None
    parts = []
    for key, value in payload.items():
        if not isinstance(key, str):
            return None
        if isinstance(value, str):
            text = _quoted(value)
        elif isinstance(value, Number):
            text = str(value)
        elif value is None:
            text = "None"
        else:
            return None
        parts.append(f"{_quoted(key)}: {text}")
    rendered = "[{" + ", ".join(parts) + "}]"
    return rendered if maxsize is None or len(rendered) < maxsize else None


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "\\'") + "'"  # saferepr quotes text so, unlike repr
