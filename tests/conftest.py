import os
import tempfile

import pytest

from tests.services import RedisServer

# Every test run gets its own data directory, so nothing touches ~/.sdgate.
os.environ.setdefault("SDGATE_HOME", tempfile.mkdtemp(prefix="sdgate-test-home-"))
# ... and builds the embedded tiny model once, for every stack and worker it starts (each has a
# home of its own; the build is process-safe: celery_bridge/tiny_model.py).
os.environ.setdefault("SDGATE_MODEL_CACHE_DIR", tempfile.mkdtemp(prefix="sdgate-test-models-"))


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()
