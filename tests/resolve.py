"""Requests as the gateway fills them: the catalogue's model and defaults in what a test left out.

Tests that compute a cache key locally (to compare with a served one) or talk to Celery directly
must key the request the gateway would key, never the request as a client sends it.
"""

from __future__ import annotations

from typing import Optional

from client.protocol import GenerationRequest
from celery_bridge.models import Catalogue, load_catalogue


def resolved(request: GenerationRequest, catalogue: Optional[Catalogue] = None) -> GenerationRequest:
    """`request` filled from `catalogue` (default: configs/models.yaml), as GatewayCatalogue.resolve does."""
    return (catalogue or load_catalogue()).fill(request)


def key_of(request: GenerationRequest, catalogue: Optional[Catalogue] = None) -> str:
    """The cache key the gateway gives `request`."""
    return resolved(request, catalogue).cache_key()
