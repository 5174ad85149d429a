"""`ray up configs/cluster.local.yaml` against this machine over SSH on loopback (opt-in).

Needs root, openssh-server and rsync (apt-get install openssh-server rsync), port 22 free on
127.0.0.1, and a few minutes for the install on the "remote" side. Run it with
SDGATE_TEST_RAY_UP=1. Teardown stops what `sdgate up` recorded, never `ray down` (`ray stop`
would kill every Ray process on the machine by name).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from cluster.local import LocalStack, StackConfig
from serve_app.config import GatewayConfig
from tests.services import REPO, free_port, wait_for_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("SDGATE_TEST_RAY_UP") != "1", reason="opt-in: set SDGATE_TEST_RAY_UP=1"),
]


@pytest.fixture
def sshd(tmp_path):
    """sshd on 127.0.0.1:22 accepting one throwaway key for root."""
    if not shutil.which("sshd") and not Path("/usr/sbin/sshd").exists():
        pytest.skip("openssh-server is not installed")
    key = tmp_path / "client_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "host_key")], check=True)
    (tmp_path / "authorized_keys").write_text((tmp_path / "client_key.pub").read_text())
    config = tmp_path / "sshd_config"
    config.write_text(f"Port 22\nListenAddress 127.0.0.1\nHostKey {tmp_path / 'host_key'}\n"
                      f"AuthorizedKeysFile {tmp_path / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
                      f"PasswordAuthentication no\nStrictModes no\nUsePAM no\nPidFile {tmp_path / 'sshd.pid'}\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    process = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stderr=open(tmp_path / "sshd.log", "w"))
    wait_for_port(22)
    yield key
    process.terminate()
    process.wait(10)


def test_ray_up_local_provider_renders_a_prompt(sshd, tmp_path):
    ports = {"SDGATE_REDIS_PORT": free_port(), "SDGATE_RAY_PORT": free_port(), "SDGATE_DASHBOARD_PORT": free_port(),
             "SDGATE_SOCKET_PORT": free_port(), "SDGATE_HTTP_PORT": free_port()}
    remote_home = tmp_path / "remote-home"
    config = yaml.safe_load((REPO / "configs" / "cluster.local.yaml").read_text())
    config["auth"]["ssh_private_key"] = str(sshd)
    prefix = " ".join(f"{name}={port}" for name, port in ports.items())
    config["head_start_ray_commands"] = [
        command.replace("SDGATE_HOME=~/.sdgate-cluster", f"SDGATE_HOME={remote_home} {prefix}")
        for command in config["head_start_ray_commands"]]
    rendered = tmp_path / "cluster.local.yaml"
    rendered.write_text(yaml.safe_dump(config))
    ray = str(Path(sys.executable).parent / "ray")
    try:
        up = subprocess.run([ray, "up", "-y", "--no-config-cache", str(rendered)], cwd=REPO, capture_output=True,
                            text=True, timeout=1200)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        out = tmp_path / "images"
        boot = subprocess.run([sys.executable, str(REPO / "client" / "boot.py"), "a lighthouse over ssh", "--port",
                               str(ports["SDGATE_SOCKET_PORT"]), "--out", str(out)], capture_output=True, text=True,
                              timeout=300)
        assert boot.returncode == 0, boot.stderr
        assert Image.open(boot.stdout.strip()).size == (64, 64)
    finally:
        LocalStack(home=remote_home, stack=StackConfig(), gateway=GatewayConfig()).down(log=lambda *_: None)
