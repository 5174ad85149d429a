"""One admission path for the socket front and HTTP: who asks (key), rate limit, size limits, caps,
and the client address those per-address limits key on (behind trusted proxies, X-Forwarded-For's).

Everything here is cheap and non-blocking, so it runs on the event loop before a request costs
a thread: a stranger or a slow peer costs a coroutine and a few counters, nothing more.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import ssl
import threading
import time
from typing import Dict, Optional, Sequence, Tuple

from client import protocol
from client.protocol import ProtocolError
from serve_app.config import GatewayConfig, Network, parse_networks
from serve_app.tenants import ANONYMOUS, OPERATOR, Tenant, TenantRegistry

log = logging.getLogger(__name__)
MAX_REQUEST_BYTES = protocol.MAX_PAYLOAD[protocol.REQUEST]  # a REQUEST frame and an HTTP body alike
MAX_JSON_DEPTH = 32  # deeper bodies are refused before json.loads can recurse
# A longer X-Forwarded-For is not believed (the peer is used): walking it must stay cheap.
MAX_FORWARDED_CHARS = 2048
MAX_FORWARDED_ENTRIES = 32


class RateLimiter:
    """Token bucket per client address; `allow` is False once the bucket is empty."""

    def __init__(self, per_s: float, burst: int):
        self.per_s, self.burst = per_s, burst
        self._buckets: Dict[str, list] = {}
        self._lock = threading.Lock()

    def allow(self, client: str) -> bool:
        if self.per_s <= 0:
            return True
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.per_s)
            if len(self._buckets) > 100_000:  # bounded memory under address churn
                self._buckets.clear()
            allowed = tokens >= 1
            self._buckets[client] = [tokens - 1 if allowed else tokens, now]
            return allowed


def check_json_depth(body: bytes, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON nested deeper than `limit` (brackets outside strings), in one linear pass."""
    depth, in_string, escaped = 0, False, False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                raise ProtocolError(protocol.E_INVALID_REQUEST,
                                    f"body nests deeper than {limit} levels; send a flat JSON object")
        elif byte in (0x5D, 0x7D):
            depth -= 1


def client_address(peer: str, forwarded_for: Optional[str], trusted: Sequence[Network]) -> str:
    """The address per-address limits key on. From a peer in `trusted`, the right-most entry of
    X-Forwarded-For that is not itself a trusted proxy (the left-most if all are); else the peer.

    Only the entries that trusted proxies appended are believed: a client can write anything to
    the left of them, so the walk stops at the first address no trusted proxy vouches for. A
    malformed entry on the way, or a header over MAX_FORWARDED_CHARS/ENTRIES, leaves the peer."""
    if not trusted or not forwarded_for or not _is_trusted(peer, trusted):
        return peer
    if len(forwarded_for) > MAX_FORWARDED_CHARS or forwarded_for.count(",") >= MAX_FORWARDED_ENTRIES:
        return peer
    address = None
    for entry in reversed(forwarded_for.split(",")):
        try:
            address = ipaddress.ip_address(entry.strip())
        except ValueError:  # a port, a name, "unknown", garbage: nothing to key on
            return peer
        if not _is_trusted(address, trusted):
            break
    return str(address)  # canonical, so one client's spellings share one bucket


def _is_trusted(address, trusted: Sequence[Network]) -> bool:
    if isinstance(address, str):
        try:
            address = ipaddress.ip_address(address)
        except ValueError:  # "?" (no peer) or a unix socket path
            return False
    if address.version == 6 and address.ipv4_mapped is not None:  # a dual-stack socket's IPv4 peer
        address = address.ipv4_mapped
    return any(address in network for network in trusted)


class Admission:
    """The replica's gatekeeper: who may talk (token), how often (rate), how much (sizes), and how
    many may wait at once (connections and waiters, per replica and per client address)."""

    def __init__(self, config: GatewayConfig, tenants: Optional[TenantRegistry] = None):
        self.config = config
        self.tenants = tenants
        self.rate_limiter = RateLimiter(config.rate_limit_per_s, config.rate_limit_burst)
        self.trusted_proxies = parse_networks(config.trusted_proxies)  # once, not per request
        self._lock = threading.Lock()
        self._connections = CountPerClient(
            config.max_connections, config.max_connections_per_client,
            full="too many connections (limit {limit}); retry in a few seconds",
            client_full="too many connections from this address (limit {limit}); reuse one connection")
        self._waiters = CountPerClient(
            config.max_waiters, config.max_waiters_per_client,
            full="{count} requests already wait for new images here (limit {limit}); cache hits are still "
                 "served, retry in a few seconds",
            client_full="too many requests from this address wait for new images (limit {limit}); retry in a "
                        "few seconds")

    @property
    def open_connections(self) -> int:
        return self._connections.count

    @property
    def waiting(self) -> int:
        return self._waiters.count

    # -- per request ------------------------------------------------------------------------------

    def client_address(self, peer: str, forwarded_for: Optional[str]) -> str:
        """The client address of an HTTP request from `peer`; see client_address()."""
        return client_address(peer, forwarded_for, self.trusted_proxies)

    def authenticate(self, given: Optional[str]) -> Tenant:
        """The tenant `given` (a key, or the shared token) names; raises `unauthorized`. With auth
        off (no shared token) everyone is the anonymous tenant."""
        expected = self.config.auth_token
        if not expected:
            return ANONYMOUS
        if given and hmac.compare_digest(given.encode(), expected.encode()):
            return OPERATOR
        tenant = self.tenants.resolve(given) if given and self.tenants is not None else None
        if tenant is None:
            raise ProtocolError(protocol.E_UNAUTHORIZED, "missing, wrong or revoked key; pass --token or set "
                                "SDGATE_TOKEN to your key (`sdgate tenant add` makes one)")
        return tenant

    def check_rate(self, client: str, tenant: Tenant = ANONYMOUS) -> None:
        """The tenant's own rate (cluster-wide) for a tenant with its own keys, else the address's."""
        if not tenant.shared:
            if self.tenants is not None:
                self.tenants.check_rate(tenant)
            return
        if not self.rate_limiter.allow(client):
            raise ProtocolError(protocol.E_RATE_LIMITED, "too many requests from this address "
                                f"(limit {self.config.rate_limit_per_s:g}/s); slow down")

    @staticmethod
    def check_size(length: int) -> None:
        if length > MAX_REQUEST_BYTES:
            raise ProtocolError(protocol.E_FRAME_TOO_LARGE, f"request body of {length} bytes is over the "
                                f"{MAX_REQUEST_BYTES}-byte limit; shorten the prompt, or send smaller images")

    # -- connections ------------------------------------------------------------------------------

    def open_connection(self, client: str) -> None:
        """Count a new connection from `client`; raises `busy` over the replica or per-address cap."""
        with self._lock:
            self._connections.enter(client)

    def close_connection(self, client: str) -> None:
        with self._lock:
            self._connections.leave(client)

    # -- waiters (every request waiting on a miss, leader or joiner) -----------------------------

    def enter_wait(self, client: str) -> None:
        """Count one more waiter on a miss; raises `busy` over the replica or per-address cap."""
        with self._lock:
            self._waiters.enter(client)

    def leave_wait(self, client: str) -> None:
        with self._lock:
            self._waiters.leave(client)


class CountPerClient:
    """Things in use (connections, waiters), in all and per client address, each under a cap.
    Not thread-safe: Admission holds its lock around every call. Messages are formatted with
    `count` (in use now) and `limit`."""

    def __init__(self, limit: int, per_client_limit: int, full: str, client_full: str):
        self.limit, self.per_client_limit = limit, per_client_limit
        self.full, self.client_full = full, client_full
        self.count = 0
        self._by_client: Dict[str, int] = {}

    def enter(self, client: str) -> None:
        """One more for `client`; raises `busy` when the total or the client's share is at its cap."""
        if self.count >= self.limit:
            raise ProtocolError(protocol.E_BUSY, self.full.format(count=self.count, limit=self.limit))
        if self._by_client.get(client, 0) >= self.per_client_limit:
            raise ProtocolError(protocol.E_BUSY, self.client_full.format(count=self.count,
                                                                           limit=self.per_client_limit))
        self.count += 1
        self._by_client[client] = self._by_client.get(client, 0) + 1

    def leave(self, client: str) -> None:
        self.count -= 1
        left = self._by_client.get(client, 0) - 1
        if left > 0:
            self._by_client[client] = left
        else:
            self._by_client.pop(client, None)


def tls_files(config: GatewayConfig) -> Tuple[Optional[str], Optional[str]]:
    """(certfile, keyfile), or (None, None) without TLS; one without the other is a config error."""
    certfile, keyfile = config.tls_certfile or None, config.tls_keyfile or None
    if bool(certfile) != bool(keyfile):
        raise ValueError("TLS needs both tls_certfile and tls_keyfile (PEM files); set both, or neither")
    return certfile, keyfile


def server_ssl_context(config: GatewayConfig) -> Optional[ssl.SSLContext]:
    """A TLS server context from tls_certfile/tls_keyfile, or None when TLS is not configured."""
    certfile, keyfile = tls_files(config)
    if certfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    return context


def insecure_auth_warning(config: GatewayConfig) -> Optional[str]:
    """The warning an operator needs when the token would cross a network in clear text, else None."""
    if not config.auth_token or config.tls_certfile:
        return None
    try:
        loopback = ipaddress.ip_address(config.host).is_loopback
    except ValueError:
        loopback = config.host == "localhost"
    if loopback:
        return None
    return (f"auth is on but TLS is off while listening on {config.host}: the shared token crosses the network "
            "in clear text; set tls_certfile and tls_keyfile (SDGATE_TLS_CERTFILE, SDGATE_TLS_KEYFILE)")
