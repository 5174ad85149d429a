import os
import tempfile

import pytest

from tests.services import RedisServer

# Every test run gets its own data directory, so nothing touches ~/.sdgate.
os.environ.setdefault("SDGATE_HOME", tempfile.mkdtemp(prefix="sdgate-test-home-"))


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()
