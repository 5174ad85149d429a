"""configs/kuberay.yaml: a valid RayService (KubeRay's CRD schema, converted to JSON Schema in
tests/data), whose serveConfigV2 passes Ray's ServeDeploySchema and is configs/serve.yaml."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.deploy import render_serve_config
from serve_app.placement import INGRESS_RESOURCE

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "configs" / "kuberay.yaml"
SCHEMA = REPO / "tests" / "data" / "rayservice.schema.json"
# Keys that carry secrets or the broker address with its password: configs/serve.yaml fills them
# from the environment of `sdgate deploy`, the pods from the sdgate-secrets Secret.
SECRET_KEYS = {"auth_token", "redis_password", "broker_url"}


def documents():
    return list(yaml.safe_load_all(MANIFEST.read_text()))


def rayservice():
    return next(doc for doc in documents() if doc["kind"] == "RayService")


def check_jsonschema(document: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    instance = tmp_path / "rayservice.json"
    instance.write_text(json.dumps(document))
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--schemafile", str(SCHEMA), str(instance)],
                          capture_output=True, text=True, timeout=120)


def test_the_rayservice_passes_the_crd_schema(tmp_path):
    result = check_jsonschema(rayservice(), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_rejects_a_misspelt_field(tmp_path):
    broken = rayservice()
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 8  # maxReplicas
    result = check_jsonschema(broken, tmp_path)
    assert result.returncode != 0 and "maxReplica" in result.stdout + result.stderr


def test_serve_config_v2_passes_rays_serve_deploy_schema():
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(yaml.safe_load(rayservice()["spec"]["serveConfigV2"]))


def without_secrets(node):
    if isinstance(node, dict):
        return {key: without_secrets(value) for key, value in node.items() if key not in SECRET_KEYS}
    if isinstance(node, list):
        return [without_secrets(item) for item in node]
    return node


def test_serve_config_v2_is_configs_serve_yaml():
    in_cluster = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    redis_url = in_cluster["applications"][0]["args"]["celery"]["redis_url"]
    rendered = render_serve_config(REPO / "configs" / "serve.yaml",
                                   {"SDGATE_BIND_HOST": "0.0.0.0", "SDGATE_REDIS_URL": redis_url,
                                    "SDGATE_TOKEN": "a-test-token"})
    assert [a["name"] for a in in_cluster["applications"]] == [a["name"] for a in rendered["applications"]]
    assert without_secrets(in_cluster) == without_secrets(rendered)
    assert not SECRET_KEYS & set(json.dumps(in_cluster).replace('"', " ").split()), \
        "secrets come from the environment, not from the Serve config"


def test_the_cluster_has_a_gpu_worker_group_that_autoscales_and_a_head_for_the_gateway():
    cluster = rayservice()["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    gpu = cluster["workerGroupSpecs"][0]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and gpu["rayStartParams"]["num-gpus"] == "1"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert float(head["resources"][INGRESS_RESOURCE]) > 0
    head_ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert 5555 in head_ports
    assert cluster["rayVersion"] == __import__("ray").__version__


def test_redis_is_its_own_deployment_and_service_without_a_password_in_the_file():
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in documents()}
    assert {("Deployment", "sdgate-redis"), ("Service", "sdgate-redis"), ("Service", "sdgate-socket")} <= kinds
    assert ("Secret", "sdgate-secrets") not in kinds, "the Secret is created by the operator, not committed"
    redis = next(doc for doc in documents() if doc["kind"] == "Deployment")
    container = redis["spec"]["template"]["spec"]["containers"][0]
    assert "requirepass" not in " ".join(container.get("command", [])), "no password on the command line"
    assert container["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "sdgate-secrets"


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_document_is_a_kubernetes_object(doc):
    assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"]
