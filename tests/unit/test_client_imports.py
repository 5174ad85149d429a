"""The client side is standard library only."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("ray", "celery", "torch", "diffusers", "redis", "yaml", "kombu", "transformers", "fastapi")


def test_importing_client_loads_no_server_dependency():
    code = ("import sys, client, client.protocol, client.boot; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_boot_client_runs_as_a_plain_script_with_no_environment(tmp_path):
    result = subprocess.run([sys.executable, "-I", str(REPO / "client" / "boot.py"), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, env={})
    assert result.returncode == 0 and "--port" in result.stdout
