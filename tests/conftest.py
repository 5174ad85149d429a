import os
import tempfile

import pytest

from tests.services import TINY_CATALOGUE, RedisServer


# Every test run gets its own data directory, so nothing touches ~/.sdgate.
os.environ.setdefault("SDGATE_HOME", tempfile.mkdtemp(prefix="sdgate-test-home-"))
# ... and builds the embedded tiny model once, for every stack and worker it starts (each has a
# home of its own; the build is process-safe: celery_bridge/tiny_model.py).
os.environ.setdefault("SDGATE_MODEL_CACHE_DIR", tempfile.mkdtemp(prefix="sdgate-test-models-"))
# ... and serves the fast random `tiny` (configs/models-tiny.yaml); the demo model's own tests name it.
os.environ.setdefault("SDGATE_MODELS_FILE", str(TINY_CATALOGUE))
# ... and renders on one torch thread per process, in every worker it starts and in its own: two
# xdist workers share two cores with their stacks, and torch's default (a thread per core in each
# process) oversubscribes them, its threads spinning for cores the other renders hold.
os.environ.setdefault("SDGATE_CPU_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


# The longest modules first (measured: `pytest --durations=0`): pytest-xdist hands out whole
# modules in collection order (`make test`: --dist loadfile), so they start at once on separate
# workers and the short ones fill in around them, instead of one long module running alone at the end.
LONGEST_FIRST = ["integration/test_cluster.py", "integration/test_faults.py", "integration/test_batching.py",
                 "integration/test_front_path.py", "integration/test_bad_input.py", "integration/test_families_served.py",
                 "unit/test_demo_meaning.py", "integration/test_worker_modes.py", "integration/test_progress.py",
                 "integration/test_models.py", "unit/test_bench.py", "integration/test_front_pressure.py"]


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        path = item.nodeid.split("::")[0].removeprefix("tests/")
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each module keeps its own order
