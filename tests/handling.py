"""Calling a worker's task body the way its consumer threads do."""

from __future__ import annotations

import threading
from typing import Dict, Sequence

from client.protocol import GenerationRequest


def handle_concurrently(service, requests: Sequence[GenerationRequest], timeout: float = 120.0) -> Dict[str, dict]:
    """`service.handle` for each request on a thread of its own, all at once (as a batching
    worker's B consumer threads call it); the results by prompt."""
    results: Dict[str, dict] = {}
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r.prompt, service.handle(r.to_dict())))
               for r in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return results
