"""Settings for opsconsole, read from the environment (django-environ).

With nothing set, the console runs on its embedded default: a SQLite file in ``data/`` and
Celery tasks executed in-process. Production deployments use ``opsconsole.settings_production``.
"""

from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env")
# Where the embedded default keeps its SQLite database and the demo targets.
DATA_DIR = Path(env.str("OPSCONSOLE_DATA_DIR", default=str(BASE_DIR / "data")))

# Only the embedded development default may use this key; production settings refuse it.
INSECURE_DEFAULT_SECRET_KEY = "django-insecure-opsconsole-development-only"  # noqa: S105
SECRET_KEY = env.str("SECRET_KEY", default=INSECURE_DEFAULT_SECRET_KEY)
DEBUG = env.bool("DEBUG", default=True)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "migrations_ops",
    "incidents",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "opsconsole.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "opsconsole.wsgi.application"

DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{DATA_DIR / 'opsconsole.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    Path(DATABASES["default"]["NAME"]).parent.mkdir(parents=True, exist_ok=True)
DATABASES["default"]["ATOMIC_REQUESTS"] = False
# Reuse the console's connection for a minute (a ?conn_max_age= in DATABASE_URL wins), checked
# before reuse and closed after an error: a new PostgreSQL connection costs a few milliseconds.
# Celery tasks follow the same rules (CELERY_DB_REUSE_MAX below, and opsconsole/celery.py).
DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("CONN_MAX_AGE", default=60))
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = env.path("STATIC_ROOT", default=BASE_DIR / "staticfiles")

LOGIN_URL = "admin:login"
CSRF_FAILURE_VIEW = "opsconsole.views.csrf_failure"

# --- Celery -----------------------------------------------------------------------------------
# Without REDIS_URL the console needs nothing else running: tasks execute in-process.
REDIS_URL = env.str("REDIS_URL", default="")
CELERY_BROKER_URL = REDIS_URL or "memory://localhost/"
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=not REDIS_URL)
CELERY_TASK_EAGER_PROPAGATES = False
CELERY_TASK_DEFAULT_QUEUE = env.str("CELERY_QUEUE", default="opsconsole")
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Celery's Django fix-up would close the console's connection before and after every task;
# this tells it to leave it (it closes it every 2000 tasks), and opsconsole/celery.py closes it
# by Django's rules instead (CONN_MAX_AGE, CONN_HEALTH_CHECKS, errors).
CELERY_DB_REUSE_MAX = 1000
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TIMEZONE = TIME_ZONE

# Two-person rule: a request not approved within this many seconds expires.
OPERATION_APPROVAL_TTL = env.int("OPERATION_APPROVAL_TTL", default=1800)

# --- Target databases ---------------------------------------------------------------------------
# Seconds to wait for a target to answer before reporting it unreachable.
TARGET_CONNECT_TIMEOUT = env.int("TARGET_CONNECT_TIMEOUT", default=5)
# Upper bound for any single statement the console runs on a target while reading or unlocking.
TARGET_STATEMENT_TIMEOUT = env.int("TARGET_STATEMENT_TIMEOUT", default=10)
# Keep PostgreSQL target connections open for lock reads and releases (each process keeps at
# most 8, none idle over 60 s or older than 5 min, each checked alive before reuse).
# False: connect every time.
TARGET_KEEP_CONNECTIONS = env.bool("TARGET_KEEP_CONNECTIONS", default=True)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        "kombu": {"level": "WARNING"},
        # In-process tasks would print a line per task into every CLI command's output.
        "celery.app.trace": {"level": "WARNING" if CELERY_TASK_ALWAYS_EAGER else "INFO"},
    },
}
