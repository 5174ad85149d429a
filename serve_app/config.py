"""Gateway configuration (configs/gateway.yaml, SDGATE_* overrides)."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
from pathlib import Path
from typing import Any, Iterable, List, Literal, Optional, Tuple, Union

from pydantic import Field, field_validator

from celery_bridge.config import Port, config_dataclass, load_config, sdgate_home

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

log = logging.getLogger(__name__)


@config_dataclass
class GatewayConfig:
    """The front server: where it listens, its cache, and the bounds it enforces."""

    host: str = "127.0.0.1"
    socket_port: Port = 5555
    http_port: Port = 8000
    cache_backend: Literal["sqlite", "redis"] = "sqlite"  # sqlite (one machine) | redis (several gateway nodes)
    cache_path: Optional[str] = None  # sqlite file; default $SDGATE_HOME/cache/images.db
    cache_max_bytes: int = 1 << 30
    max_pending_misses: int = 64  # distinct generations in flight per replica before `busy`
    request_timeout_s: float = 300.0
    frame_timeout_s: float = 10.0  # a started frame must arrive completely within this
    idle_timeout_s: float = 120.0  # a connection with no request for this long is closed
    max_connections: int = 4096
    handler_threads: Optional[int] = None  # deprecated and ignored (waiters cost no thread); see front_threads
    auth_token: Optional[str] = None  # shared token for socket and HTTP; off when empty
    rate_limit_per_s: float = 0.0  # per client address, 0 = off
    rate_limit_burst: int = 20
    stats_flush_s: float = 0.5
    # -- front path under pressure (issue 12): waiters, per-client caps, claim leases, TLS --
    max_waiters: int = 4096  # requests waiting on misses (leaders and joiners) per replica before `busy`
    max_waiters_per_client: int = 512  # of those, from one client address
    max_connections_per_client: int = 2048  # open connections from one client address
    front_threads: int = 4  # each of the two small pools: cache reads, and claims/submits/cache writes
    claim_lease_s: float = 5.0  # a claim lapses this long after its replica stops renewing it (died)
    flight_timeout_s: float = 900.0  # a generation nobody answers for this long is given up
    fast_http_port: int = 8001  # HTTP served by each replica itself (SO_REUSEPORT), no Serve proxy hop
    tls_certfile: Optional[str] = None  # PEM certificate chain; with tls_keyfile, TLS is on for the socket port and HTTP
    tls_keyfile: Optional[str] = None  # PEM private key of tls_certfile
    # -- tenants (issue 18): keys, limits and fair share (serve_app/tenants.py, celery_bridge/fair_share.py) --
    fair_share: bool = True  # misses wait in per-tenant backlogs and start by weight; off: first in, first out
    # CIDRs of the reverse proxies in front of HTTP: from these peers only, X-Forwarded-For names the client
    trusted_proxies: List[str] = dataclasses.field(default_factory=list)
    # -- clients (issue 19): Images API URLs, the A1111 API --
    image_url_ttl_s: int = Field(default=3600, ge=1, le=7 * 86400)  # response_format "url": how long a URL works

    @field_validator("trusted_proxies")
    @classmethod
    def _check_networks(cls, value: List[str]) -> List[str]:
        parse_networks(value)
        return value

    def resolved_cache_path(self) -> Path:
        return Path(self.cache_path).expanduser() if self.cache_path else sdgate_home() / "cache" / "images.db"


def parse_networks(cidrs: Iterable[str]) -> Tuple[Network, ...]:
    """The networks of `cidrs` (a bare address is its /32 or /128); ValueError says what to write."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip()))
        except ValueError:
            try:
                loose = ipaddress.ip_network(cidr.strip(), strict=False)
            except ValueError:
                raise ValueError(f"trusted_proxies entry {cidr!r} is not an IP network; write a CIDR such as "
                                 "10.0.0.0/8 or fd00::/8, or one address such as 10.1.2.3") from None
            raise ValueError(f"trusted_proxies entry {cidr!r} has host bits set; write its network, "
                             f"{loose.with_prefixlen}, or the one address {cidr.split('/')[0]}") from None
    return tuple(networks)


def load_gateway_config(**overrides: Any) -> GatewayConfig:
    # One name for the token everywhere: clients, `sdgate deploy` and the gateway read SDGATE_TOKEN.
    if os.environ.get("SDGATE_AUTH_TOKEN") is not None:
        raise ValueError("SDGATE_AUTH_TOKEN is not read: set the shared token in SDGATE_TOKEN")
    config = load_config(GatewayConfig, "gateway", overrides)
    if config.handler_threads is not None:
        log.warning("gateway setting handler_threads=%s is ignored: waiting clients no longer take a thread "
                    "each; remove it (front_threads sizes the gateway's two small pools)", config.handler_threads)
    return config
