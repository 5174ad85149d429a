"""The client side is standard library only: importing it loads no server dependency."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("ray", "celery", "torch", "diffusers", "redis", "yaml", "kombu", "transformers", "fastapi", "PIL")


def test_importing_client_loads_no_server_dependency():
    code = ("import sys, client, client.protocol, client.boot; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                            env={})
    assert result.stdout.strip() == "", f"client imports pulled in: {result.stdout.strip()}"


def test_client_sources_import_only_the_standard_library_and_client():
    allowed = set(sys.stdlib_module_names) | {"client", "__future__"}
    for path in sorted((REPO / "client").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}, which is not standard library"


def test_boot_client_runs_as_a_plain_script_with_no_environment(tmp_path):
    result = subprocess.run([sys.executable, "-I", str(REPO / "client" / "boot.py"), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, env={})
    assert result.returncode == 0 and "--port" in result.stdout
