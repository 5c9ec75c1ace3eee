"""Settings for the test suite: the console's own database is PostgreSQL, the broker is Redis.

``TEST_DATABASE_URL`` and ``TEST_REDIS_URL`` point elsewhere; a developer's own ``DATABASE_URL``
is never touched. Tasks run eagerly unless a test starts a real worker (``tests/worker.py``).
"""

import os

from opsconsole.settings import *  # noqa: F403
from opsconsole.settings import env

DATABASES = {
    "default": env.db("TEST_DATABASE_URL", default="postgres://postgres@127.0.0.1:5432/test"),
}
# A test database per run, so that runs side by side on one server do not trample each other.
DATABASES["default"]["TEST"] = {"NAME": f"test_opsconsole_{os.getpid()}"}
REDIS_URL = env.str("TEST_REDIS_URL", default="redis://127.0.0.1:6379/15")
CELERY_BROKER_URL = REDIS_URL
CELERY_TASK_ALWAYS_EAGER = True
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
TARGET_CONNECT_TIMEOUT = 3
# A queue of this test run's own, so a real worker started by the tests takes only its tasks.
CELERY_TASK_DEFAULT_QUEUE = f"opsconsole-test-{os.getpid()}"
# Nearly every test reads a target of its own: a process-wide pool as large as production's
# would only pile up idle sessions on the shared test server.
TARGET_KEEP_CONNECTIONS_MAX = 8
# The tests' HTTP servers listen on loopback; the policy's refusals are tested without it.
HEALTH_CHECK_ALLOWED_NETWORKS = ["127.0.0.0/8"]
