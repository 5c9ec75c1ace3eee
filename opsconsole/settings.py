"""Settings for opsconsole, read from the environment (django-environ).

With nothing set, the console runs on its embedded default: a SQLite file in ``data/`` and
Celery tasks executed in-process. Production deployments use ``opsconsole.settings_production``.
"""

import base64
import datetime as dt
import hashlib
import ipaddress
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

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
    "opsconsole.apps.OpsAdminConfig",  # django.contrib.admin, its index on the fleet
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_beat",
    "axes",
    "django_otp",
    "django_otp.plugins.otp_totp",
    "migrations_ops",
    "incidents",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # A request id and the client's address for every audit event the request writes.
    "opsconsole.middleware.RequestContextMiddleware",
    # A 400 for a NUL character in the path or query string, before anything reads them.
    "opsconsole.middleware.HostileInputMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django_otp.middleware.OTPMiddleware",  # request.user.is_verified()
    # Who is asking, for audit events written without the request in hand.
    "opsconsole.middleware.ActingUserMiddleware",
    # A 403 (or an API 400) to a known user or token is a refused request, on the audit trail.
    "migrations_ops.refusals.RefusalAuditMiddleware",
    # Django's MessageMiddleware, building the message storage only for a request that uses it.
    "opsconsole.middleware.LazyMessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes requires: it turns a locked-out login into its refusal page.
    "axes.middleware.AxesMiddleware",
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

# --- Logging in: throttling, lock-out, two factors ----------------------------------------------
# django-axes counts failed logins and refuses further attempts once AXES_FAILURE_LIMIT is
# reached, for AXES_COOLOFF_MINUTES (a console admin lifts it sooner: *Access attempts* in the
# admin, or `manage.py axes_reset_username NAME`). Its backend must come first.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env.int("AXES_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = dt.timedelta(minutes=env.int("AXES_COOLOFF_MINUTES", default=15))
# Locked out: the pair of user name and address, not either alone. By user name alone, anyone
# could lock an on-call engineer out in the middle of an incident by typing wrong passwords;
# by address alone, one mistyping colleague behind the office NAT or VPN would lock out all the
# others. The pair stops password guessing against an account from one address, and the
# account's owner still logs in from their own.
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
# Failed logins stay listed (*Access failure logs*) after a lock-out is lifted.
AXES_ENABLE_ACCESS_FAILURE_LOG = True
AXES_SENSITIVE_PARAMETERS = ["password", "otp_token"]
# Behind TRUSTED_PROXY_COUNT reverse proxies the client's address is the one the outermost
# proxy put in X-Forwarded-For, not REMOTE_ADDR (which is the nearest proxy).
TRUSTED_PROXY_COUNT = env.int("TRUSTED_PROXY_COUNT", default=0)
AXES_CLIENT_IP_CALLABLE = "opsconsole.security.client_ip"
# Two-factor authentication for the admin (django-otp, TOTP devices managed by console admins
# under *TOTP devices*): members of OTP_REQUIRED_GROUPS must give a token from their device to
# use the admin. ADMIN_OTP_REQUIRED=true names the Console admin and Incident commander groups
# (migrations_ops/roles.py). Off by default.
ADMIN_OTP_REQUIRED = env.bool("ADMIN_OTP_REQUIRED", default=False)
OTP_REQUIRED_GROUPS = env.list(
    "OTP_REQUIRED_GROUPS",
    default=["Console admin", "Incident commander"] if ADMIN_OTP_REQUIRED else [],
)
OTP_TOTP_ISSUER = "opsconsole"
CSRF_FAILURE_VIEW = "opsconsole.views.csrf_failure"

# --- Celery -----------------------------------------------------------------------------------
# Without REDIS_URL the console needs nothing else running: tasks execute in-process.
REDIS_URL = env.str("REDIS_URL", default="")
CELERY_BROKER_URL = REDIS_URL or "memory://localhost/"
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=not REDIS_URL)
CELERY_TASK_EAGER_PROPAGATES = False
CELERY_TASK_DEFAULT_QUEUE = env.str("CELERY_QUEUE", default="opsconsole")
# At-least-once delivery, run at most once: a task is acknowledged only once it has run (acks
# late) and is put back if its worker process dies (reject on worker lost); one worker process
# holds one unacknowledged task at a time (prefetch 1). A task delivered again finds its
# operation already claimed and does nothing (services.execute_operation).
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# The soft time limit fails a running operation cleanly (its target connection closes, so the
# target rolls back its open transaction); the hard limit kills the worker process a minute
# later. Redis hands a message not acknowledged within visibility_timeout to another worker, so
# the timeout must outlast the longest a task may run -- the hard limit -- or an operation still
# running would be delivered again.
OPERATION_SOFT_TIME_LIMIT = env.int("OPERATION_SOFT_TIME_LIMIT", default=900)
CELERY_TASK_SOFT_TIME_LIMIT = OPERATION_SOFT_TIME_LIMIT
CELERY_TASK_TIME_LIMIT = OPERATION_SOFT_TIME_LIMIT + 60
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": CELERY_TASK_TIME_LIMIT + 300}
# Celery's Django fix-up would close the console's connection before and after every task;
# this tells it to leave it (it closes it every 2000 tasks), and opsconsole/celery.py closes it
# by Django's rules instead (CONN_MAX_AGE, CONN_HEALTH_CHECKS, errors).
CELERY_DB_REUSE_MAX = 1000
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TIMEZONE = TIME_ZONE

# Two-person rule: a request not approved within this many seconds expires.
OPERATION_APPROVAL_TTL = env.int("OPERATION_APPROVAL_TTL", default=1800)

# The runbook's alert thresholds, as the fleet view on the admin index applies them
# (selectors.fleet_overview): a lock held longer than ALERT_LOCK_HELD_SECONDS, or more than
# ALERT_FAILURE_RATE of the past 24 h's migrations failed, is critical; more than
# ALERT_RETRY_RATE of them retried for the lock is a warning.
ALERT_LOCK_HELD_SECONDS = env.int("ALERT_LOCK_HELD_SECONDS", default=30)
ALERT_FAILURE_RATE = env.float("ALERT_FAILURE_RATE", default=0.10)
ALERT_RETRY_RATE = env.float("ALERT_RETRY_RATE", default=0.50)

# The sweeper (services.sweep_operations; `make beat` runs it every OPERATION_SWEEP_INTERVAL s).
# A running operation's worker refreshes its heartbeat every OPERATION_HEARTBEAT_SECONDS; one
# not heard from for OPERATION_LOST_AFTER seconds is marked lost. An operation queued longer
# than OUTBOX_RESEND_AFTER seconds (its task never sent, or lost) is sent again.
OPERATION_HEARTBEAT_SECONDS = env.float("OPERATION_HEARTBEAT_SECONDS", default=10)
OPERATION_LOST_AFTER = env.int(
    "OPERATION_LOST_AFTER", default=int(3 * OPERATION_HEARTBEAT_SECONDS + 30)
)
OUTBOX_RESEND_AFTER = env.int("OUTBOX_RESEND_AFTER", default=60)
OPERATION_SWEEP_INTERVAL = env.int("OPERATION_SWEEP_INTERVAL", default=30)
# Every worker writes that it is alive (migrations_ops.models.WorkerHeartbeat) when ready and
# every WORKER_HEARTBEAT_SECONDS. When no worker of the task queue has been seen within
# WORKER_SEEN_WITHIN seconds, the dashboard, /api/migrations/health (critical) and /metrics say
# so: nothing would run the operations the console queues. Not with tasks run in-process.
# Keep WORKER_SEEN_WITHIN a few heartbeats long, or a worker alive is reported missing.
WORKER_HEARTBEAT_SECONDS = env.float("WORKER_HEARTBEAT_SECONDS", default=15)
WORKER_SEEN_WITHIN = env.int("WORKER_SEEN_WITHIN", default=60)
# Every target's lock is read this often (services.observe_targets), so the dashboard, the
# metrics and the health endpoint never go on showing a lock its holder has since released.
LOCK_OBSERVE_INTERVAL = env.int("LOCK_OBSERVE_INTERVAL", default=30)
# Celery beat keeps its schedule in the console's database (django-celery-beat: editable in
# the admin); the entries below are written there whenever beat starts. Beat runs the sweep
# itself, in its own process (opsconsole.beat): with every worker dead, the sweep still marks
# their operations lost. The lock reads go to the workers.
CELERY_BEAT_SCHEDULER = "opsconsole.beat:ConsoleScheduler"
CELERY_BEAT_SCHEDULE = {
    "sweep-operations": {
        "task": "migrations_ops.sweep_operations",
        # Run by beat itself, one sweep at a time (no message, so nothing to expire).
        "schedule": float(OPERATION_SWEEP_INTERVAL),
    },
    "observe-targets": {
        "task": "migrations_ops.observe_targets",
        "schedule": float(LOCK_OBSERVE_INTERVAL),
        "options": {"expires": LOCK_OBSERVE_INTERVAL},
    },
}

# --- Target databases ---------------------------------------------------------------------------
# Seconds to wait for a target to answer before reporting it unreachable.
TARGET_CONNECT_TIMEOUT = env.int("TARGET_CONNECT_TIMEOUT", default=5)
# Upper bound for any single statement the console runs on a target while reading or unlocking.
TARGET_STATEMENT_TIMEOUT = env.int("TARGET_STATEMENT_TIMEOUT", default=10)
# Keep PostgreSQL target connections open for reuse by every read and operation (none idle
# over 60 s or older than 5 min; before reuse each is checked alive, and its session is reset
# with DISCARD ALL after a migration's own SQL ran on it, so nothing it SET is carried over).
# False: connect every time.
TARGET_KEEP_CONNECTIONS = env.bool("TARGET_KEEP_CONNECTIONS", default=True)
# How many kept target connections each process keeps idle at most: at least the number of
# PostgreSQL targets, since the status API reads every target every STATUS_MAX_AGE seconds
# (with fewer, each of those reads opens a connection: a new server process on the target).
TARGET_KEEP_CONNECTIONS_MAX = env.int("TARGET_KEEP_CONNECTIONS_MAX", default=64)
# Seconds an application's health URL (Target.health_url) has for the whole of one check:
# resolution, connection, TLS, the answer and every redirect. An incident's targets are checked
# at once, so its Run checks takes about this long however many of them are slow.
HEALTH_CHECK_TIMEOUT = env.float("HEALTH_CHECK_TIMEOUT", default=5)


def health_check_networks(default: list[str]) -> list[str]:
    """HEALTH_CHECK_ALLOWED_NETWORKS: the networks (CIDRs) a health check may reach besides the
    public internet. Loopback, link-local (cloud metadata), private (RFC 1918, ULA), shared,
    multicast, reserved and unspecified addresses are refused otherwise, after DNS resolution
    and on every redirect. Each is checked here, so that a typo stops the start, not a check."""
    networks = [text.strip() for text in env.list("HEALTH_CHECK_ALLOWED_NETWORKS", default=default)]
    for text in filter(None, networks):
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ImproperlyConfigured(
                f"HEALTH_CHECK_ALLOWED_NETWORKS: {text!r} is not a network (e.g. 10.0.0.0/8)"
            ) from None
    return list(filter(None, networks))


# The development console (DEBUG) may check health URLs on this machine; production allows
# nothing but public addresses unless told (settings_production).
HEALTH_CHECK_ALLOWED_NETWORKS = health_check_networks(["127.0.0.0/8", "::1/128"] if DEBUG else [])
# Target connection URLs are stored encrypted (Fernet) with these keys: the first encrypts,
# every one decrypts, so a new key goes first and the old one stays until `ops rotate-secrets`
# has re-encrypted every URL. A key: python -c "from cryptography.fernet import Fernet;
# print(Fernet.generate_key().decode())". Without one, a development console (DEBUG) derives
# its key from SECRET_KEY; production settings require it.
TARGET_SECRET_KEY = env.list("TARGET_SECRET_KEY", default=[])
if not TARGET_SECRET_KEY and DEBUG:
    TARGET_SECRET_KEY = [
        base64.urlsafe_b64encode(
            hashlib.sha256(f"opsconsole target urls:{SECRET_KEY}".encode()).digest()
        ).decode()
    ]

# The audit trail's hash chain is keyed (HMAC-SHA-256) with this secret, kept out of the
# database, so that whoever can write to the console's database cannot rewrite the chain to
# match an altered row (migrations_ops/audit_chain.py). Never change it once events exist:
# `ops audit-verify` would then report every event. Without one, a development console (DEBUG)
# derives it from SECRET_KEY; production settings require it.
AUDIT_CHAIN_KEY = env.str("AUDIT_CHAIN_KEY", default="")
if not AUDIT_CHAIN_KEY and DEBUG:
    AUDIT_CHAIN_KEY = hashlib.sha256(f"opsconsole audit chain:{SECRET_KEY}".encode()).hexdigest()
# The audit chain's newest id and hash, written (signed with AUDIT_CHAIN_KEY) after each
# audit event commits, outside the database, so that `ops audit-verify` notices events removed
# from the chain's end or an emptied table (migrations_ops/audit_witness.py). Keep it where the
# console's processes can write and a database writer cannot; hosts that share it (a shared
# file system with POSIX locks) pin every event, a host with its own pins those it wrote.
AUDIT_WITNESS_PATH = Path(
    env.str("AUDIT_WITNESS_PATH", default=str(DATA_DIR / "audit-witness.json"))
)

# --- the API's caches ---------------------------------------------------------------------------
# Shared by every process through Redis when CACHE_URL (by default REDIS_URL, the broker's) is
# set; otherwise each process keeps its own (then the flags endpoint checks the target's row on
# each request, so a change made by another process is still seen at once: see
# services.flags_document). While that Redis cannot be reached each process carries on with its
# own, reading from the database what must be the same everywhere (opsconsole/cache.py).
CACHE_URL = env.str("CACHE_URL", default=REDIS_URL)
# Seconds to connect to the cache's Redis, and to wait for an answer: past them the request
# goes on without the cache.
CACHE_SOCKET_TIMEOUT = env.float("CACHE_SOCKET_TIMEOUT", default=0.25)
# Seconds a process goes on without the cache's Redis after it failed, before trying again.
CACHE_RETRY_SECONDS = env.float("CACHE_RETRY_SECONDS", default=5)
if CACHE_URL:
    CACHES = {
        "default": {
            # Django's, made cheaper, carrying on without Redis while it is down.
            "BACKEND": "opsconsole.cache.DegradingRedisCache",
            "LOCATION": CACHE_URL,
            "KEY_PREFIX": env.str("CACHE_KEY_PREFIX", default="opsconsole"),
            "RETRY_SECONDS": CACHE_RETRY_SECONDS,
            "OPTIONS": {
                "socket_connect_timeout": CACHE_SOCKET_TIMEOUT,
                "socket_timeout": CACHE_SOCKET_TIMEOUT,
            },
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
# GET /api/migrations/status answers from a reading of each target at most this many seconds
# old (each target's answer says how old); an older one is read again (one request at a time:
# the others serve it meanwhile, with its age), and ?live=1 reads all now.
STATUS_MAX_AGE = env.float("STATUS_MAX_AGE", default=5)
# A reading found older is read again in a thread of its own, while requests answer with the
# one they have (a few seconds older, and saying so); false: the request reads it first.
STATUS_READ_AGAIN_IN_BACKGROUND = env.bool("STATUS_READ_AGAIN_IN_BACKGROUND", default=True)
# Seconds an authenticated API token is remembered (a revoke forgets it at once).
API_TOKEN_CACHE_SECONDS = env.int("API_TOKEN_CACHE_SECONDS", default=60)

# Error reports (Django's debug page, kept with DEBUG on for the embedded console, and error
# mails) show settings, the environment and the traceback's variables: URLs masked, secrets
# hidden (opsconsole/security.py).
DEFAULT_EXCEPTION_REPORTER_FILTER = "opsconsole.security.SecretsExceptionReporterFilter"
DEFAULT_EXCEPTION_REPORTER = "opsconsole.security.SecretsExceptionReporter"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        "kombu": {"level": "WARNING"},
        # django-axes announces its configuration at every start, CLI commands included.
        "axes.apps": {"level": "WARNING"},
        # In-process tasks would print a line per task into every CLI command's output.
        "celery.app.trace": {"level": "WARNING" if CELERY_TASK_ALWAYS_EAGER else "INFO"},
    },
}
