"""Converts a Kubernetes CRD's openAPIV3Schema to a JSON Schema (draft 2020-12) for check-jsonschema.

    python tests/data/crd_to_jsonschema.py ray.io_rayservices.yaml v1 > tests/data/rayservice.schema.json

The input is KubeRay's ray-operator/config/crd/bases/ray.io_rayservices.yaml (the stored schema:
github.com/ray-project/kuberay at feeaf72facab4881ba2b179248bb67315634e229). Like kubeconform's
openapi2jsonschema in strict mode: objects with listed properties reject unknown keys (the API
server would silently drop them, so a typo would go unnoticed), int-or-string becomes either,
nullable admits null, and the x-kubernetes-* annotations are dropped.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml

DROPPED = ("x-kubernetes-list-map-keys", "x-kubernetes-list-type", "x-kubernetes-map-type",
           "x-kubernetes-validations", "x-kubernetes-embedded-resource", "description")


def convert(node: Any) -> Any:
    if isinstance(node, list):
        return [convert(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: convert(value) for key, value in node.items() if key not in DROPPED}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("anyOf", None)
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def main(path: str, version: str) -> None:
    crd = yaml.safe_load(open(path))
    spec = crd["spec"]
    schema = next(v["schema"]["openAPIV3Schema"] for v in spec["versions"] if v["name"] == version)
    converted = convert(schema)
    converted["properties"]["apiVersion"] = {"const": f"{spec['group']}/{version}"}
    converted["properties"]["kind"] = {"const": spec["names"]["kind"]}
    converted["required"] = sorted(set(converted.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    document = {"$schema": "https://json-schema.org/draft/2020-12/schema",
                "title": f"{spec['names']['kind']} {spec['group']}/{version} (converted from the KubeRay CRD)",
                **converted}
    json.dump(document, sys.stdout, separators=(",", ":"), sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "v1")
