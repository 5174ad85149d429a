"""The config files: Ray's own validators accept them; sdgate's loader rejects what it can't use."""

import json
from pathlib import Path

import pytest
import yaml

from celery_bridge.config import CeleryConfig, load_celery_config, load_config
from cluster.deploy import render_serve_config
from serve_app.config import load_gateway_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_cluster_yaml_passes_rays_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CONFIGS / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))
    start = " ".join(raw["head_start_ray_commands"])
    assert "--port=6380" in start and '"port 6379"' in start and "redis-server /home/ubuntu/redis.conf" in start
    assert raw["available_node_types"]["sdgate.gpu"]["resources"]["GPU"] == 1
    assert raw["available_node_types"]["sdgate.gpu"]["min_workers"] == 0


def test_the_redis_minimum_agrees_everywhere():
    """README, redis_check and the cluster configs state one minimum, and both clusters install a
    Redis that meets it: cluster.yaml checks what apt installed, kuberay.yaml's image is newer."""
    import re

    from celery_bridge.redis_check import MIN_REDIS_VERSION, minimum

    stated = {path: set(re.findall(r"Redis >= (\d+\.\d+)", (CONFIGS.parent / path).read_text()))
              for path in ("README.md", "configs/cluster.yaml", "celery_bridge/redis_check.py")}
    assert all(found == {minimum()} for found in stated.values()), stated
    cluster = yaml.safe_load((CONFIGS / "cluster.yaml").read_text())
    assert 'python -m celery_bridge.redis_check "$(command -v redis-server)"' in cluster["head_setup_commands"][-1]
    image = re.search(r"image: redis:(\d+)\.(\d+)", (CONFIGS / "kuberay.yaml").read_text())
    assert (int(image.group(1)), int(image.group(2))) >= MIN_REDIS_VERSION


def test_cluster_yaml_validator_rejects_an_unknown_key():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CONFIGS / "cluster.yaml").read_text())
    raw["available_node_types"]["sdgate.gpu"]["gpus_per_node"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(raw))


def test_serve_yaml_renders_and_passes_the_serve_schema():
    config = render_serve_config(CONFIGS / "serve.yaml", {"SDGATE_TOKEN": "secret", "SDGATE_REDIS_URL":
                                                          "redis://head:6379/0", "SDGATE_REDIS_PASSWORD": "pw"})
    apps = {app["name"]: app for app in config["applications"]}
    assert "secret" not in json.dumps(config) and ":pw@" not in json.dumps(config), "no secret in the Serve config"
    workers = apps["workers-demo"]["deployments"][0]
    assert workers["ray_actor_options"]["num_gpus"] == 1
    policy = workers["autoscaling_config"]["policy"]
    assert policy["policy_function"] == "celery_bridge.autoscaling:WorkerLoadPolicy"
    assert policy["policy_kwargs"]["queue_name"] == "sdgate.demo"
    gateway_policy = apps["gateway"]["deployments"][0]["autoscaling_config"]["policy"]["policy_function"]
    assert gateway_policy == "serve_app.autoscaling:gateway_load_policy"


def test_serve_yaml_has_a_workers_application_per_catalogued_model_on_its_own_queue():
    from celery_bridge.models import load_catalogue, queue_for

    config = render_serve_config(CONFIGS / "serve.yaml", {"SDGATE_REDIS_URL": "redis://head:6379/0",
                                                          "SDGATE_TOKEN": "a-test-token"})
    apps = {app["name"]: app for app in config["applications"]}
    for model in load_catalogue(CONFIGS / "models.yaml").names:
        app = apps[f"workers-{model}"]
        assert app["args"]["worker"]["model"] == model
        policy = app["deployments"][0]["autoscaling_config"]["policy"]["policy_kwargs"]
        assert policy["queue_name"] == queue_for(app["args"].get("celery", {}).get("queue", "sdgate"), model)


def test_worker_deployments_leave_their_concurrency_to_the_batch_size():
    """A worker replica consumes with max_ongoing_requests threads and batches up to max_batch_size:
    a config pinning the first would starve the batcher, which then waits out batch_wait_ms per image."""
    from celery_bridge.consumer import build_app, replica_batch_size
    from celery_bridge.config import load_worker_config

    config = render_serve_config(CONFIGS / "serve.yaml", {"SDGATE_REDIS_URL": "redis://head:6379/0",
                                                          "SDGATE_TOKEN": "a-test-token"})
    manifest = next(d for d in yaml.safe_load_all((CONFIGS / "kuberay.yaml").read_text()) if d["kind"] == "RayService")
    for apps in (config["applications"], yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"]):
        for app in apps:
            if app["import_path"] == "celery_bridge.consumer:build_app":
                assert all("max_ongoing_requests" not in d for d in app["deployments"]), app["name"]
    app = build_app({"worker": {"model": "tiny", "num_gpus": 1, "max_batch_size": 4}})
    assert app._bound_deployment._deployment_config.max_ongoing_requests == 4
    assert replica_batch_size(load_worker_config(model="tiny", num_gpus=1, max_batch_size=4)) == 4


def test_serve_yaml_with_an_unset_variable_is_refused(tmp_path):
    broken = tmp_path / "serve.yaml"
    broken.write_text((CONFIGS / "serve.yaml").read_text().replace("${SDGATE_REDIS_URL}", "${SDGATE_NO_SUCH}"))
    with pytest.raises(KeyError, match="SDGATE_NO_SUCH"):
        render_serve_config(broken, {"SDGATE_TOKEN": "secret"})


@pytest.mark.parametrize("env", [{}, {"SDGATE_TOKEN": ""}])
def test_deploy_refuses_an_unset_or_empty_token(env):
    """Item 8: auth is never silently off."""
    with pytest.raises(ValueError, match="SDGATE_TOKEN"):
        render_serve_config(CONFIGS / "serve.yaml", env)


def test_deploy_without_auth_only_when_asked_for(monkeypatch, tmp_path):
    monkeypatch.setenv("SDGATE_SECRETS_FILE", str(tmp_path / "absent.env"))
    with pytest.raises(ValueError, match="SDGATE_TOKEN is unset or empty"):
        render_serve_config(CONFIGS / "serve.yaml", {})
    config = render_serve_config(CONFIGS / "serve.yaml", {"SDGATE_AUTH": "off"})
    gateway = next(app for app in config["applications"] if app["name"] == "gateway")
    assert "auth_token" not in gateway["args"]["gateway"]


def test_deploy_finds_the_token_in_the_secrets_file(monkeypatch, tmp_path):
    secrets = tmp_path / "secrets.env"
    secrets.write_text("SDGATE_TOKEN=a-real-token-from-the-file\n")
    secrets.chmod(0o600)
    monkeypatch.setenv("SDGATE_SECRETS_FILE", str(secrets))
    config = render_serve_config(CONFIGS / "serve.yaml", {})
    assert "a-real-token-from-the-file" not in json.dumps(config)  # replicas read it themselves


def test_deploy_refuses_the_old_token_variable():
    with pytest.raises(ValueError, match="SDGATE_TOKEN everywhere"):
        render_serve_config(CONFIGS / "serve.yaml", {"SDGATE_TOKEN": "x", "SDGATE_AUTH_TOKEN": "y"})


def test_environment_overrides_yaml(monkeypatch):
    monkeypatch.setenv("SDGATE_SOCKET_PORT", "6001")
    monkeypatch.setenv("SDGATE_VISIBILITY_TIMEOUT_S", "42")
    assert load_gateway_config().socket_port == 6001
    assert load_celery_config().visibility_timeout_s == 42


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("SDGATE_SOCKET_PORT", "lots")
    with pytest.raises(ValueError, match="SDGATE_SOCKET_PORT"):
        load_gateway_config()


def test_unknown_setting_in_yaml_is_refused(tmp_path, monkeypatch):
    (tmp_path / "celery.yaml").write_text("redis_url: redis://x:1/0\nvisiblity_timeout_s: 5\n")
    monkeypatch.setenv("SDGATE_CONFIG_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="visiblity_timeout_s"):
        load_config(CeleryConfig, "celery")


def test_password_goes_into_the_broker_url_only():
    config = CeleryConfig(redis_url="redis://head:6379/0", redis_password="pw")
    assert config.broker_url() == "redis://:pw@head:6379/0"


def test_field_names_are_unique_across_sections():
    """One SDGATE_<NAME> variable must mean one thing everywhere."""
    import dataclasses

    from celery_bridge.config import WorkerConfig
    from cluster.local import StackConfig
    from serve_app.config import GatewayConfig

    seen = {}
    for cls in (CeleryConfig, WorkerConfig, GatewayConfig, StackConfig):
        for field in dataclasses.fields(cls):
            assert field.name not in seen, f"{field.name} is in both {seen.get(field.name)} and {cls.__name__}"
            seen[field.name] = cls.__name__


def test_local_workers_split_the_cores_but_one_for_the_gateway():
    from cluster.local import cpu_threads_per_worker

    assert cpu_threads_per_worker(1, cores=1) == 1
    assert cpu_threads_per_worker(1, cores=2) == 1
    assert cpu_threads_per_worker(2, cores=2) == 1
    assert cpu_threads_per_worker(3, cores=2) == 1
    assert cpu_threads_per_worker(1, cores=16) == 15
    assert cpu_threads_per_worker(2, cores=16) == 7


def test_cluster_yaml_keeps_secrets_off_command_lines_and_services_off_the_internet():
    raw = yaml.safe_load((CONFIGS / "cluster.yaml").read_text())
    start = " ".join(raw["head_start_ray_commands"])
    assert "--requirepass" not in start and "umask 077" in start  # the password sits in a 0600 conf file
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0 " not in start.split("ray start")[0]
    assert '"bind 127.0.0.1 $(hostname -I' in start and '"protected-mode yes"' in start
    assert '"maxmemory-policy noeviction"' in start
