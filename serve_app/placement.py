"""Where gateway replicas run: on the node clients connect to.

Socket clients connect to HEAD:5555, so a gateway replica must run on the head. The head
advertises a custom Ray resource (`ray start --resources='{"sdgate_ingress": 1}'`, set by
configs/cluster.yaml, configs/kuberay.yaml and `sdgate up`) and each Gateway replica asks for a
small share of it: replicas land only there, several of them sharing port 5555 (SO_REUSEPORT).
To serve clients from more nodes, advertise the resource on those nodes too.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional

INGRESS_RESOURCE = "sdgate_ingress"
INGRESS_NODE_CAPACITY = 1.0  # what an ingress node advertises
INGRESS_PER_REPLICA = 0.01  # what a gateway replica needs: up to 100 replicas per ingress node


def ingress_node_resources() -> Dict[str, float]:
    """The custom resources of a node that takes gateway replicas."""
    return {INGRESS_RESOURCE: INGRESS_NODE_CAPACITY}


def ray_start_resources_flag() -> str:
    """`ray start` flag that makes the node an ingress node."""
    return f"--resources={json.dumps(ingress_node_resources())}"


def ingress_actor_options(base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """`ray_actor_options` that pin a replica to an ingress node (on top of `base`)."""
    options = dict(base or {})
    options["resources"] = dict(options.get("resources") or {}, **{INGRESS_RESOURCE: INGRESS_PER_REPLICA})
    return options
