import os
import tempfile
from pathlib import Path

import pytest

from tests.services import RedisServer

TINY_CATALOGUE = Path(__file__).resolve().parents[1] / "configs" / "models-tiny.yaml"

# Every test run gets its own data directory, so nothing touches ~/.sdgate.
os.environ.setdefault("SDGATE_HOME", tempfile.mkdtemp(prefix="sdgate-test-home-"))
# ... and builds the embedded tiny model once, for every stack and worker it starts (each has a
# home of its own; the build is process-safe: celery_bridge/tiny_model.py).
os.environ.setdefault("SDGATE_MODEL_CACHE_DIR", tempfile.mkdtemp(prefix="sdgate-test-models-"))
# ... and serves the fast random `tiny` (configs/models-tiny.yaml); the demo model's own tests name it.
os.environ.setdefault("SDGATE_MODELS_FILE", str(TINY_CATALOGUE))


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()
