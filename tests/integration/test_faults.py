"""Faults on the real local stack, in both worker modes: a worker SIGKILLed mid-generation, a long
task outliving the visibility timeout, Redis stopped and restarted, a gateway replica killed (with
a client in flight, and while it writes a burst of new images), a cache writer killed mid-burst,
a task the broker lost. Each test asserts what the user saw and that nothing was lost. The plain
stack ends with `down`, which must stop exactly what `up` started.

One stack per worker mode (class-scoped), torn down before the next starts; the visibility
timeout is short (3 s) so a redelivery shows up in seconds.
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import redis

from celery_bridge.worker import RECONNECT_INTERVAL_MAX_S
from client import protocol
from client.protocol import GenerationRequest, ProtocolError
from cluster.local import LocalStack, _group_tree, _reap, port_in_use
from serve_app.store import SQLiteImageStore
from celery_bridge.models import queue_for
from celery_bridge.config import CeleryConfig
from celery_bridge.producer import GenerationProducer, new_task_id
from tests.resolve import key_of, resolved
from tests.integration.harness import (GATEWAY_REPLICA, WORKER_REPLICA, TaskRuns, ask, cache_entries,
                                       cache_integrity, cached_pngs, connect, healthz, local_stack, replica_pids,
                                       settled_counters, slow_request, steps_done, wait_for)
from tests.services import REPO

pytestmark = pytest.mark.integration
VISIBILITY_S = 3
FAULT_ENV = {"SDGATE_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S), "SDGATE_LEASE_RENEW_S": "0.5"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# A request's deadline in these stacks: a render killed mid-way is redelivered and rendered again,
# which took 42 to 61 s under the suite's load on a 2-core machine (ci26, ci27).
FAULT_REQUEST_TIMEOUT_S = 120


@pytest.fixture(scope="class")
def plain_stack():
    with local_stack("celery", workers=2, env=FAULT_ENV, request_timeout_s=FAULT_REQUEST_TIMEOUT_S) as stack:
        yield stack


@pytest.fixture(scope="class")
def ray_stack():
    with local_stack("ray", workers=2, env=FAULT_ENV, request_timeout_s=FAULT_REQUEST_TIMEOUT_S) as stack:
        yield stack


def in_thread(work) -> tuple:
    """Run work() in a thread; returns (thread, outcome) where outcome gets 'reply' or 'error'."""
    outcome: dict = {}

    def run():
        try:
            outcome["reply"] = work()
        except BaseException as exc:  # noqa: BLE001 - asserted by the caller
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def persist_append_only_file(stack: LocalStack) -> None:
    """Rewrite Redis's append-only file from its dataset and wait until the rewrite is done."""
    client = redis.Redis.from_url(stack.redis_url, socket_timeout=5)
    try:
        client.bgrewriteaof()  # in progress, or scheduled behind a save, once it returns

        def rewritten() -> bool:
            info = client.info("persistence")
            return not (info["aof_rewrite_in_progress"] or info["aof_rewrite_scheduled"])

        wait_for(rewritten, 30, "the append-only file rewritten")
        assert client.info("persistence")["aof_last_bgrewrite_status"] == "ok"
    finally:
        client.close()


# -- shared by both worker modes ------------------------------------------------------------------

def check_long_task_runs_once(stack: LocalStack) -> None:
    request = slow_request(stack, f"one long render in {stack.stack.worker_mode} mode", seconds=3 * VISIBILITY_S)
    runs = TaskRuns(stack.redis_url, key_of(request))
    try:
        started = time.monotonic()
        reply = ask(stack, request)
        took = time.monotonic() - started
        assert took > 2 * VISIBILITY_S, f"took {took:.1f} s; the task must outlive the visibility timeout"
        assert reply.meta["key"] == key_of(request)
        # A lease left to expire would have been redelivered to the idle worker while the render ran
        # (it ran past 2 visibility timeouts); once acked, nothing can redeliver it.
        assert runs.wait_succeeded(10) == 1 and len(runs.started()) == 1, f"ran more than once: {runs.events}"
    finally:
        runs.close()


def check_worker_killed_mid_generation(stack: LocalStack) -> int:
    """SIGKILL the worker that runs a generation; the client still gets the image. Returns the victim."""
    request = slow_request(stack, f"the worker dies under me in {stack.stack.worker_mode} mode", seconds=8)
    key = key_of(request)
    submitted = settled_counters(stack)["generations"]
    runs = TaskRuns(stack.redis_url, key)
    try:
        client, outcome = in_thread(lambda: ask(stack, request, timeout=150))
        victim = runs.wait_started(60)
        wait_for(lambda: steps_done(stack, key) >= 2, 60, "the render inside its denoising loop")
        os.kill(victim, signal.SIGKILL)
        client.join(150)
        assert not client.is_alive(), "the client hung"
        assert "reply" in outcome, f"the client got {outcome.get('error')!r} instead of its image"
        reply = outcome["reply"]
        assert reply.meta["key"] == key and reply.png.startswith(PNG_SIGNATURE)
        assert not reply.meta["worker"].endswith(f":{victim}"), "answered by the killed worker?"
        started = runs.started()
        assert len(started) == 2 and started[0] == victim and started[1] != victim, runs.events
        assert runs.wait_succeeded() == 1, runs.events
    finally:
        runs.close()
    assert cached_pngs(stack, key) == [reply.png], "exactly one image cached: the one the client got"
    assert settled_counters(stack)["generations"] == submitted + 1, "one task, redelivered; not a second submission"
    assert ask(stack, request).statuses[0]["state"] == protocol.STATUS_CACHED
    return victim


# -- plain `sdgate worker` processes --------------------------------------------------------------

class TestPlainWorkers:
    def test_a_task_longer_than_the_visibility_timeout_runs_once(self, plain_stack):
        check_long_task_runs_once(plain_stack)

    def test_worker_sigkilled_mid_generation_loses_nothing(self, plain_stack):
        victim = check_worker_killed_mid_generation(plain_stack)
        respawn_worker(plain_stack, victim)

    def test_cache_writer_sigkilled_mid_burst_never_serves_a_bad_image(self, plain_stack):
        stack = plain_stack
        printed = []  # entries the writer reported committed before it was killed
        served, errors = [], []
        stop = threading.Event()

        def reader():  # a client asking for committed entries while the writer is killed again and again
            while not stop.is_set():
                if printed:
                    index = random.choice(printed)
                    try:
                        served.append((index, ask(stack, burst_request(index))))
                    except Exception as exc:  # noqa: BLE001 - asserted below
                        errors.append(exc)
                time.sleep(0.05)

        reading = threading.Thread(target=reader, daemon=True)
        reading.start()
        try:
            for round_start in range(0, 250, 50):  # five bursts, each SIGKILLed part way
                writer = subprocess.Popen([sys.executable, "-c", BURST_WRITER, str(stack.paths.cache_db),
                                           str(round_start), "50"], cwd=REPO, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, start_new_session=True)
                kill_at = round_start + random.randint(5, 40)
                for line in writer.stdout:
                    printed.append(int(line))
                    if int(line) >= kill_at:
                        break
                os.kill(writer.pid, signal.SIGKILL)
                writer.wait(10)
                assert writer.returncode == -signal.SIGKILL, writer.stderr.read().decode()[-2000:]
                printed.extend(int(line) for line in writer.stdout.read().split())  # flushed before the kill
        finally:
            stop.set()
            reading.join(30)

        # 1. The file opens cleanly and is sound.
        assert cache_integrity(stack) == "ok"
        store = SQLiteImageStore(stack.paths.cache_db, max_bytes=stack.gateway.cache_max_bytes)
        try:
            assert store.integrity_check()
            # 2. Every committed entry is there, byte for byte; one cut off by the kill is absent, never partial.
            present = 0
            for index in range(250):
                entry = store.get(key_of(burst_request(index)))
                if entry is None:
                    assert index not in printed, f"committed entry {index} was lost"
                else:
                    present += 1
                    assert entry.png == burst_png(index), f"entry {index} is corrupt"
            assert store.corrupt_dropped == 0
            assert present >= len(set(printed))
        finally:
            store.close()
        # 3. What clients were served, during the bursts and now, is exactly what was written.
        assert not errors, errors[:3]
        assert served, "the reader was served while the writer was being killed"
        for index, reply in served:
            assert reply.png == burst_png(index), f"served a different image for entry {index}"
        for index in (printed[0], printed[-1]):
            reply = ask(stack, burst_request(index))
            assert reply.statuses[0]["state"] == protocol.STATUS_CACHED and reply.png == burst_png(index)
        print(f"\n[cache writer kill] 5 SIGKILLs, {len(set(printed))} committed entries intact, "
              f"{len(served)} hits served during the bursts, 0 corrupt")

    def test_gateway_sigkilled_mid_cache_writes_never_serves_a_bad_image(self, plain_stack):
        """The gateway replica itself, SIGKILLed while it is writing a burst of new images to its store."""
        stack = plain_stack
        [old] = replica_pids(stack, GATEWAY_REPLICA)
        requests = [GenerationRequest(f"written when the gateway dies {i}", seed=i) for i in range(40)]
        before = cache_entries(stack)
        clients = [in_thread(lambda r=r: ask(stack, r, timeout=60)) for r in requests]
        wait_for(lambda: cache_entries(stack) >= before + 5, 60, "the gateway writing the burst")
        os.kill(old, signal.SIGKILL)
        killed = time.monotonic()
        for thread, _ in clients:
            thread.join(70)
            assert not thread.is_alive(), "a client of the killed gateway hung"
        got = {request.prompt: outcome["reply"].png for request, (_, outcome) in zip(requests, clients)
               if "reply" in outcome}
        for request, (_, outcome) in zip(requests, clients):
            if "error" in outcome:  # a clean close or a retryable error, nothing else
                assert isinstance(outcome["error"], (OSError, ProtocolError)), repr(outcome["error"])
        wait_for(lambda: [p for p in replica_pids(stack, GATEWAY_REPLICA) if p != old], 90,
                 "Serve replacing the gateway replica")

        # The store opens cleanly and every entry in it is whole.
        assert cache_integrity(stack) == "ok"
        store = SQLiteImageStore(stack.paths.cache_db, max_bytes=stack.gateway.cache_max_bytes)
        try:
            assert store.integrity_check()
            stored = {request.prompt: store.get(key_of(request)) for request in requests}
            assert store.corrupt_dropped == 0
        finally:
            store.close()
        # Every request is served again by the new replica: a whole PNG of its own prompt, the same
        # bytes as before the kill.
        for request in requests:
            reply = wait_for(lambda: ask_or_none(stack, request), 60, "the new gateway replica serving")
            check_png(reply.png, request.prompt)
            if request.prompt in got:
                assert reply.png == got[request.prompt], "served different bytes after the kill"
            if stored[request.prompt] is not None:
                assert stored[request.prompt].png == reply.png
                assert reply.statuses[0]["state"] == protocol.STATUS_CACHED
        cached = sum(entry is not None for entry in stored.values())
        print(f"\n[gateway kill mid-writes] {len(got)} of 40 answered before the kill, {cached} cached, "
              f"all 40 served whole {time.monotonic() - killed:.1f} s after the kill, 0 corrupt")

    def test_a_queued_task_the_broker_lost_is_queued_again(self, plain_stack):
        """kombu's Redis transport drops a message it has popped (BRPOP) but not yet recorded as
        unacked when the worker's broker connection restarts at that moment, which happens after a
        Redis restart. Simulated here by popping the queued message; the gateway requeues it.

        The two renders that keep the workers busy are sent straight to the Celery queue (no
        tenant, as the requeue path sends), outside fair share, so the gateway's dispatcher sees
        both slots free and the lost request waits in the Celery queue, where kombu can lose it."""
        stack = plain_stack
        busy = [resolved(slow_request(stack, f"keeps worker {i} busy while a task is lost", seconds=5)).normalized()
                for i in range(2)]
        runs = [TaskRuns(stack.redis_url, key_of(request)) for request in busy]
        sender = GenerationProducer(CeleryConfig(redis_url=stack.redis_url))
        blockers = []
        for request in busy:
            task_id = new_task_id(request.cache_key())
            future = sender.watch(task_id)
            sender.submit(request, task_id)
            blockers.append(in_thread(lambda f=future: f.result(timeout=120)))
        try:
            for watcher in runs:
                watcher.wait_started(60)
        finally:
            for watcher in runs:
                watcher.close()
        lost = GenerationRequest("a task the broker loses", seed=9)
        client, outcome = in_thread(lambda: ask(stack, lost, timeout=120))
        broker = redis.Redis.from_url(stack.redis_url)
        queue = queue_for("sdgate", "tiny")  # the default model's queue
        wait_for(lambda: broker.llen(queue) == 1, 20, "the task waiting in the queue")
        raw = broker.rpop(queue)
        assert f"sdgate-{key_of(lost)}".encode() in raw
        lost_at = time.monotonic()
        client.join(90)
        assert "reply" in outcome, f"the client got {outcome.get('error')!r}, not its image"
        assert outcome["reply"].meta["key"] == key_of(lost)
        print(f"\n[lost task] requeued and served {time.monotonic() - lost_at:.1f} s after the broker lost it")
        for thread, result in blockers:
            thread.join(60)
            assert "reply" in result and result["reply"].ok, result
        sender.close()

    @pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
    def test_redis_restarted_while_requests_are_in_flight(self, plain_stack, stop_signal):
        stack = plain_stack
        name = stop_signal.name
        hit = GenerationRequest(f"cached before redis gets {name}", seed=1)
        hit_png = ask(stack, hit).png
        cached_before = cache_entries(stack)
        # 1. Three slow misses in flight: two generating (two workers), one queued behind them.
        slow = [slow_request(stack, f"in flight {i} when redis gets {name}", seconds=4) for i in range(3)]
        runs = TaskRuns(stack.redis_url, key_of(slow[0]))
        clients = [in_thread(lambda r=r: ask(stack, r, timeout=stack.gateway.request_timeout_s + 30)) for r in slow]
        runs.wait_started(60)
        runs.close()
        persist_append_only_file(stack)  # the queued task and the claims are on disk, as everysec has them within 1 s

        # 2. Redis goes away.
        redis_pid = stack._load()["processes"]["redis"]
        os.kill(redis_pid, stop_signal)
        wait_for(lambda: not port_in_use(stack.stack.redis_port), 20, "redis-server stopping")
        _reap(redis_pid)
        # While it is down: hits are still served from the cache, a new miss is refused at once.
        assert ask(stack, hit, timeout=20).png == hit_png
        started = time.monotonic()
        with pytest.raises(ProtocolError) as refused:
            ask(stack, GenerationRequest(f"a new miss while redis is down {name}"), timeout=30)
        assert refused.value.code == protocol.E_UNAVAILABLE and "retry" in refused.value.message
        assert time.monotonic() - started < 10, "refused promptly, not after a hang"

        # 3. Redis comes back on the same port with its append-only file. The gateway reconnects by
        # itself: a new miss is accepted (queued) within 10 s, and rendered once the workers get to it.
        stack._start_redis()
        back = time.monotonic()
        fresh = GenerationRequest(f"a new miss after redis came back {name}")
        conn = wait_for(lambda: submit_when_accepted(stack, fresh), 10, "a new miss accepted after Redis came back",
                        interval=0.5)
        print(f"\n[redis {name}] new miss accepted {time.monotonic() - back:.1f} s after Redis came back")
        with conn:
            reply = read_until_image(conn, timeout=stack.gateway.request_timeout_s + 10)
        print(f"[redis {name}] and rendered {time.monotonic() - back:.1f} s after")
        assert reply.meta["key"] == key_of(fresh)

        # 4. Every in-flight client got its image or a clear retryable error; none hung.
        for (thread, outcome), request in zip(clients, slow):
            thread.join(stack.gateway.request_timeout_s + 40)
            assert not thread.is_alive(), "an in-flight client hung"
            if "reply" in outcome:
                assert outcome["reply"].meta["key"] == key_of(request)
            else:
                error = outcome["error"]
                assert isinstance(error, ProtocolError) and error.code in protocol.RETRYABLE_CODES, repr(error)
            print(f"[redis {name}] in-flight {request.prompt!r}: "
                  f"{'image' if 'reply' in outcome else outcome['error'].code}")

        # 5. The cache is intact and still serves what it held.
        assert cache_integrity(stack) == "ok"
        assert cache_entries(stack) >= cached_before
        assert ask(stack, hit).png == hit_png

    def test_workers_take_new_work_soon_after_a_long_redis_outage(self, plain_stack):
        """Celery's own reconnect backoff grows by 2 s an attempt (2, 4, 6 ... 30 s), so after a long
        outage the workers would sleep up to 30 s before seeing Redis back. Redis stays down until
        every worker has retried at sdgate's cap three times in a row (Celery's own never repeats
        an interval), then new work must render within 10 s of Redis coming back."""
        stack = plain_stack
        logs = sorted(stack.paths.logs.glob("worker-*.log"))
        offsets = {log: log.stat().st_size for log in logs}
        capped = f"Trying again in {RECONNECT_INTERVAL_MAX_S:.2f} seconds"
        redis_pid = stack._load()["processes"]["redis"]
        os.kill(redis_pid, signal.SIGKILL)
        down = time.monotonic()
        wait_for(lambda: not port_in_use(stack.stack.redis_port), 20, "redis-server stopping")
        _reap(redis_pid)

        def retries_at_the_cap() -> bool:
            return all(log.read_bytes()[offsets[log]:].decode(errors="replace").count(capped) >= 3 for log in logs)

        wait_for(retries_at_the_cap, 60, f"every worker retrying the broker every {RECONNECT_INTERVAL_MAX_S} s",
                 interval=0.5)
        outage_s = time.monotonic() - down
        stack._start_redis()
        back = time.monotonic()
        fresh = GenerationRequest(f"the first miss after a {outage_s:.0f} s outage {time.time()}")
        conn = wait_for(lambda: submit_when_accepted(stack, fresh), 10, "a new miss accepted", interval=0.5)
        with conn:
            reply = read_until_image(conn, timeout=60)
        rendered = time.monotonic() - back
        print(f"\n[redis down {outage_s:.0f} s] a new miss rendered {rendered:.1f} s after Redis came back")
        assert reply.meta["key"] == key_of(fresh)
        assert rendered < 10, f"rendered {rendered:.1f} s after Redis came back"

    def test_down_at_the_end_stops_exactly_what_up_started(self, plain_stack):
        """Last of the class, on its stack (one of its own would cost a start-up): `down` ends every
        group `up` recorded, including the workers and the Redis the tests above restarted, and nothing else."""
        stack = plain_stack
        groups = dict(stack._load()["processes"])
        assert {"redis", "ray", "worker-tiny-0", "worker-tiny-1"} <= set(groups)
        bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        try:
            stack.down(log=lambda *_: None)  # as `sdgate down` does it: the workers' warm shutdown, Ray's short grace
            for name, pgid in groups.items():
                assert not _group_tree(pgid), f"{name} still runs"
            assert bystander.poll() is None, "down must not stop processes it did not start"
            for port in (stack.gateway.socket_port, stack.stack.redis_port, stack.stack.ray_port):
                assert not port_in_use(port)
            with pytest.raises((ConnectionError, OSError, ProtocolError)):
                ask(stack, GenerationRequest("nobody home"))
        finally:
            bystander.kill()


def ask_or_none(stack: LocalStack, request: GenerationRequest):
    try:
        return ask(stack, request, timeout=30)
    except (ProtocolError, OSError):
        return None


def check_png(png: bytes, prompt: str) -> None:
    """A whole PNG (every chunk's CRC checked on load) whose parameters start with `prompt`."""
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    image.load()
    assert image.format == "PNG" and image.text["parameters"].startswith(prompt)


def submit_when_accepted(stack: LocalStack, request: GenerationRequest):
    """The open connection once the gateway has queued `request`; None if it refused (e.g. unavailable)."""
    conn = connect(stack)
    try:
        conn.sendall(protocol.encode_request(request))
        frame = protocol.read_frame(conn, 15)
        if frame.kind == protocol.STATUS and frame.json()["state"] == protocol.STATUS_QUEUED:
            return conn
    except (ProtocolError, OSError):
        pass
    conn.close()
    return None


def read_until_image(conn, timeout: float) -> protocol.ImageReply:
    deadline = time.monotonic() + timeout
    while True:
        frame = protocol.read_frame(conn, 5, idle_timeout=max(deadline - time.monotonic(), 0.1))
        if frame.kind == protocol.IMAGE:
            return protocol.ImageReply(*protocol.decode_image(frame))
        if frame.kind == protocol.ERROR:
            raise protocol.decode_error(frame)


def respawn_worker(stack: LocalStack, victim: int) -> None:
    """Start the killed plain worker again under its name, and wait until it consumes."""
    name = next(n for n, pgid in stack._load()["processes"].items() if pgid == victim)
    log = stack.paths.logs / f"{name}.log"
    ready_before = log.read_text(errors="replace").count(" ready.")
    stack.spawn_worker(name)
    wait_for(lambda: log.read_text(errors="replace").count(" ready.") > ready_before, 120, f"{name} restarting")


# The cache writer killed mid-burst: entries are deterministic, so any served byte can be checked.
def burst_request(index: int) -> GenerationRequest:
    return GenerationRequest(f"burst entry {index}", seed=index)


def burst_png(index: int) -> bytes:
    rng = random.Random(index)
    return PNG_SIGNATURE + rng.randbytes(rng.randint(50_000, 400_000))


BURST_WRITER = f"""
import sys
from pathlib import Path
from serve_app.store import SQLiteImageStore
from tests.integration.test_faults import burst_png, burst_request
from tests.resolve import key_of
store = SQLiteImageStore(Path(sys.argv[1]), max_bytes={1 << 30})
start, count = int(sys.argv[2]), int(sys.argv[3])
for index in range(start, start + count):
    key = key_of(burst_request(index))
    store.put(key, burst_png(index), {{"key": key, "burst": index}})
    print(index, flush=True)  # committed
"""


# -- Ray Serve task-consumer replicas -------------------------------------------------------------

class TestRayWorkers:
    def test_a_task_longer_than_the_visibility_timeout_runs_once(self, ray_stack):
        check_long_task_runs_once(ray_stack)

    def test_worker_replica_sigkilled_mid_generation_loses_nothing(self, ray_stack):
        before = replica_pids(ray_stack, WORKER_REPLICA)
        victim = check_worker_killed_mid_generation(ray_stack)
        assert victim in before, "the task ran in one of this stack's worker replicas"
        # Serve replaces the dead replica.
        wait_for(lambda: len([p for p in replica_pids(ray_stack, WORKER_REPLICA) if p != victim]) == 2, 90,
                 "Serve replacing the killed worker replica")

    def test_gateway_replica_sigkilled(self, ray_stack, capsys):
        from client.boot import BootClient, ClientError

        stack = ray_stack
        [old] = replica_pids(stack, GATEWAY_REPLICA)
        boot = BootClient(port=stack.gateway.socket_port, timeout=120)
        warm = GenerationRequest("the boot client before the gateway dies", seed=3)
        assert boot.generate(warm).png  # its connection is open now
        idle = connect(stack)
        slow = slow_request(stack, "in flight when the gateway replica dies", seconds=8)
        runs = TaskRuns(stack.redis_url, key_of(slow))
        try:
            client, outcome = in_thread(lambda: boot.generate(slow))
            runs.wait_started(60)
            time.sleep(0.5)
            os.kill(old, signal.SIGKILL)
            killed = time.monotonic()

            # 1. Connected clients see a clean close or an error at once, never a hang.
            idle.settimeout(10)
            try:
                assert idle.recv(1) == b""
            except ConnectionResetError:
                pass
            idle.close()
            client.join(30)
            assert not client.is_alive(), "the boot client hung"
            answered = time.monotonic() - killed
            assert "reconnecting and sending the request again" in capsys.readouterr().err, "retried once"
            with capsys.disabled():
                print(f"\n[gateway kill] in-flight boot client, {answered:.1f} s after the kill: "
                      f"{'image' if 'reply' in outcome else outcome['error']}")
            if "error" in outcome:
                assert isinstance(outcome["error"], ClientError), repr(outcome["error"])
                assert "sdgate server" in str(outcome["error"])

            # 2. Serve replaces the replica; the next requests succeed on the same boot client.
            new = wait_for(lambda: [p for p in replica_pids(stack, GATEWAY_REPLICA) if p != old], 90,
                           "Serve replacing the gateway replica")
            reply = wait_for(lambda: boot_try(boot, slow), 90, "the boot client served again", interval=0.5)
            with capsys.disabled():
                print(f"[gateway kill] replica {old} -> {new}; served again {time.monotonic() - killed:.1f} s "
                      "after the kill")
            assert reply.meta["key"] == key_of(slow)
            assert len(runs.started()) == 1, "the new replica joined the running task instead of rendering again"
        finally:
            runs.close()
        assert boot.generate(warm).statuses[0]["state"] == protocol.STATUS_CACHED
        assert healthz(stack)["ok"] is True
        boot.close()


def boot_try(boot, request):
    from client.boot import ClientError

    try:
        return boot.generate(request)
    except ClientError:
        return None
