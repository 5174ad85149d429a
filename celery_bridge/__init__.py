"""The Celery side of sdgate: task contract, producer, workers.

`celery -A celery_bridge ...` (and Flower) finds the module-level app as `celery_bridge.celery`;
it is built on first use, so importing this package loads no Celery.
"""


def __getattr__(name: str):
    if name == "celery":
        from celery_bridge.app import app

        return app
    raise AttributeError(f"module 'celery_bridge' has no attribute {name!r}")
