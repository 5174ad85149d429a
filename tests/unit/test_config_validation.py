"""Typed config (pydantic): every YAML key and SDGATE_* value is checked at load, with errors that
name the file or variable, the key, the value and what was expected. Secrets, Redis arguments."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from celery_bridge.config import (CeleryConfig, ConfigError, WorkerConfig, load_celery_config, load_config,
                                  load_worker_config)
from cluster.local import load_stack_config
from serve_app.config import load_gateway_config
from tests.services import TINY_CATALOGUE

CONFIGS = Path(__file__).resolve().parents[2] / "configs"




def test_every_shipped_yaml_loads():
    load_celery_config(), load_worker_config(), load_gateway_config(), load_stack_config()


def test_the_retired_handler_threads_setting_loads_with_a_warning(configs, caplog):
    (configs / "gateway.yaml").write_text("handler_threads: 64\n")
    with caplog.at_level("WARNING", logger="serve_app.config"):
        config = load_gateway_config()
    assert config.handler_threads == 64, "an old config file still loads"
    assert "handler_threads=64 is ignored" in caplog.text and "remove it" in caplog.text


def test_the_shipped_gateway_config_has_no_retired_setting(caplog):
    with caplog.at_level("WARNING", logger="serve_app.config"):
        load_gateway_config()
    assert "handler_threads" not in caplog.text


def test_a_quoted_no_is_not_true(configs):
    (configs / "worker.yaml").write_text('fp16: "no"\n')
    with pytest.raises(ConfigError) as caught:
        load_worker_config()
    message = str(caught.value)
    assert str(configs / "worker.yaml") in message and "fp16" in message and "'no'" in message
    assert "valid boolean" in message


@pytest.mark.parametrize("section, text, key", [
    ("gateway", "socket_port: '5555'\n", "socket_port"),
    ("gateway", "socket_port: 70000\n", "socket_port"),
    ("gateway", "cache_backend: memcached\n", "cache_backend"),
    ("celery", "result_expires_s: 1.5\n", "result_expires_s"),
    ("worker", "device: gpu\n", "device"),
    ("local", "worker_mode: docker\n", "worker_mode"),
    ("gateway", "rate_limit_per_s: true\n", "rate_limit_per_s"),
])
def test_wrong_types_are_errors_that_name_file_key_and_value(configs, section, text, key):
    (configs / f"{section}.yaml").write_text(text)
    loader = {"gateway": load_gateway_config, "celery": load_celery_config, "worker": load_worker_config,
              "local": load_stack_config}[section]
    with pytest.raises(ConfigError, match=key) as caught:
        loader()
    assert f"{section}.yaml" in str(caught.value)
    assert text.split(": ", 1)[1].strip().strip("'").lower() in str(caught.value).lower()


def test_unknown_keys_are_errors_in_yaml_and_overrides(configs):
    (configs / "gateway.yaml").write_text("sokcet_port: 1\n")
    with pytest.raises(ConfigError, match="sokcet_port"):
        load_gateway_config()
    (configs / "gateway.yaml").write_text("")
    with pytest.raises(ConfigError, match="unknown setting 'sokcet_port'"):
        load_gateway_config(sokcet_port=1)


def test_environment_strings_are_parsed_and_checked(configs, monkeypatch):
    monkeypatch.setenv("SDGATE_FP16", "no")
    monkeypatch.setenv("SDGATE_NUM_GPUS", "0.5")
    monkeypatch.setenv("SDGATE_MODEL_CACHE_DIR", "")
    config = load_worker_config()
    assert config.fp16 is False and config.num_gpus == 0.5 and config.model_cache_dir is None
    monkeypatch.setenv("SDGATE_FP16", "maybe")
    with pytest.raises(ConfigError, match="SDGATE_FP16='maybe'"):
        load_worker_config()
    monkeypatch.setenv("SDGATE_FP16", "1")
    monkeypatch.setenv("SDGATE_DEVICE", "tpu")
    with pytest.raises(ConfigError, match="SDGATE_DEVICE='tpu'.*'auto', 'cuda' or 'cpu'"):
        load_worker_config()


def test_overrides_are_checked_strictly(configs):
    with pytest.raises(ConfigError, match="visibility_timeout_s = '10'"):
        load_celery_config(visibility_timeout_s="10")
    with pytest.raises(ValueError, match="fp16"):
        WorkerConfig(fp16="yes")  # type: ignore[arg-type]  # constructing directly validates too


# -- secrets ---------------------------------------------------------------------------------------

def test_secrets_come_from_the_secrets_file(configs):
    (configs / "secrets.env").write_text("# comment\nSDGATE_REDIS_PASSWORD='ab/cd+ef='\nSDGATE_TOKEN=tok-123\n")
    (configs / "secrets.env").chmod(0o600)
    assert load_celery_config().redis_password == "ab/cd+ef="
    assert load_gateway_config().auth_token == "tok-123"


def test_environment_wins_over_the_secrets_file(configs, monkeypatch):
    (configs / "secrets.env").write_text("SDGATE_TOKEN=from-file\n")
    monkeypatch.setenv("SDGATE_TOKEN", "from-env")
    assert load_gateway_config().auth_token == "from-env"


@pytest.mark.parametrize("variable, loader", [("SDGATE_REDIS_PASSWORD", load_celery_config),
                                              ("SDGATE_TOKEN", load_gateway_config)])
def test_the_example_secrets_are_refused(configs, monkeypatch, variable, loader):
    example = dict(line.split("=", 1) for line in (CONFIGS / "secrets.env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    (configs / "secrets.env").write_text(f"{variable}={example[variable]}\n")
    with pytest.raises(ConfigError, match="example value.*secrets.env.example"):
        loader()
    (configs / "secrets.env").unlink()
    monkeypatch.setenv(variable, example[variable])
    with pytest.raises(ConfigError, match=variable):
        loader()


def test_serve_yaml_carries_no_secrets():
    text = (CONFIGS / "serve.yaml").read_text()
    for variable in ("SDGATE_TOKEN", "SDGATE_REDIS_PASSWORD"):
        assert "${" + variable + "}" not in text, f"{variable} would be readable in the Serve config"


# -- Redis connection arguments ---------------------------------------------------------------------

@pytest.mark.parametrize("url, username, password, host", [
    ("redis://head:6379/0", None, "ab/cd+ef=", "head"),
    ("redis://[::1]:6400/3", "sdgate-user", "p@ss:w/rd%", "::1"),
    ("redis://alice:pw%2F1@10.0.0.5:6379/0", None, None, "10.0.0.5"),
])
def test_broker_url_round_trips_through_redis_py_and_kombu(url, username, password, host):
    from kombu.utils.url import url_to_parts
    from redis.connection import parse_url

    config = CeleryConfig(redis_url=url, redis_username=username, redis_password=password)
    kwargs = config.redis_kwargs()
    assert kwargs["host"] == host
    if password:
        assert kwargs["password"] == password
    broker = config.broker_url()
    again = parse_url(broker)
    assert (again["host"], again.get("username"), again.get("password"), again["db"]) == \
        (kwargs["host"], kwargs.get("username"), kwargs.get("password"), kwargs["db"])
    parts = url_to_parts(broker)
    assert (parts.hostname, parts.username, parts.password, parts.port) == \
        (kwargs["host"], kwargs.get("username"), kwargs.get("password"), kwargs["port"])


def test_redis_client_uses_redis_py_arguments():
    config = CeleryConfig(redis_url="redis://[::1]:6400/2", redis_username="u", redis_password="ab/cd+ef=")
    client = config.redis_client(socket_timeout=3)
    options = client.connection_pool.connection_kwargs
    assert (options["host"], options["port"], options["db"], options["username"], options["password"],
            options["socket_timeout"]) == ("::1", 6400, 2, "u", "ab/cd+ef=", 3)


def test_load_config_keeps_its_signature():
    import inspect

    assert list(inspect.signature(load_config).parameters) == ["cls", "section", "overrides"]


def test_the_cli_reports_a_bad_setting_without_a_traceback(configs):
    import subprocess
    import sys

    (configs / "local.yaml").write_text("workers: two\n")
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "status"], capture_output=True, text=True,
                            timeout=60, env=dict(os.environ), cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "local.yaml: workers = 'two' is not valid: Input should be a valid integer" in result.stderr


def test_a_misspelt_variable_is_reported_by_the_cli(configs):
    import subprocess
    import sys

    env = dict(os.environ, SDGATE_SOKET_PORT="6001", SDGATE_TEST_ANYTHING="1",
               SDGATE_MODELS_FILE=str(TINY_CATALOGUE))
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "status"], capture_output=True, text=True,
                            timeout=60, env=env, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    assert "SDGATE_SOKET_PORT is not an sdgate setting; it is ignored (did you mean SDGATE_SOCKET_PORT?)" \
        in result.stderr
    assert "SDGATE_TEST_ANYTHING" not in result.stderr
    assert "SDGATE_MODELS_FILE" not in result.stderr, "the catalogue's variable is read, not ignored"
