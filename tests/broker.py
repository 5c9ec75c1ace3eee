"""The task broker out of reach, for real: the Celery app pointed at a Redis port where nothing
listens, so a send meets a refused connection."""

import contextlib


@contextlib.contextmanager
def broker_down():
    from opsconsole.celery import app

    keys = ["task_always_eager", "broker_url", "task_publish_retry", "broker_connection_retry"]
    saved = {key: app.conf[key] for key in keys}
    app.conf.update(
        task_always_eager=False,
        broker_url="redis://127.0.0.1:1/0",
        task_publish_retry=False,
        broker_connection_retry=False,
    )
    forget_broker_pools(app)
    try:
        yield
    finally:
        app.conf.update(saved)
        forget_broker_pools(app)


def forget_broker_pools(app):
    """The next send dials ``broker_url``. The pools are not closed: kombu shares them
    process-wide, keyed by URL, and the good one is wanted again afterwards."""
    app._pool = None
    app.amqp._producer_pool = None
