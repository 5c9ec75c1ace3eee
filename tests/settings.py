"""Settings for the test suite: the console's own database is PostgreSQL, the broker is Redis.

Tasks run eagerly unless a test starts a real worker (see ``tests/conftest.py``).
"""

import os

os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")

from opsconsole.settings import *  # noqa: E402, F403

CELERY_TASK_ALWAYS_EAGER = True
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
TARGET_CONNECT_TIMEOUT = 3
