"""Production settings: everything from the environment, nothing insecure by default."""

from cryptography.fernet import Fernet
from django.core.exceptions import ImproperlyConfigured

from .settings import *  # noqa: F403
from .settings import INSECURE_DEFAULT_SECRET_KEY, env, health_check_networks

DEBUG = env.bool("DEBUG", default=False)
SECRET_KEY = env.str("SECRET_KEY", default="")
if (
    not SECRET_KEY
    or SECRET_KEY == INSECURE_DEFAULT_SECRET_KEY
    or SECRET_KEY.startswith("django-insecure")
    or len(SECRET_KEY) < 50
    or len(set(SECRET_KEY)) < 5
):
    raise ImproperlyConfigured(
        "SECRET_KEY must be set to a random value of at least 50 characters in production "
        '(python -c "import secrets; print(secrets.token_urlsafe(64))")'
    )
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS")
# Health checks reach public addresses only, unless networks are named (settings.py).
HEALTH_CHECK_ALLOWED_NETWORKS = health_check_networks([])

# The key that encrypts the targets' connection URLs (settings.py): never derived here.
TARGET_SECRET_KEY = env.list("TARGET_SECRET_KEY", default=[])
if not TARGET_SECRET_KEY:
    raise ImproperlyConfigured(
        "TARGET_SECRET_KEY must be set in production: it encrypts the targets' connection URLs "
        '(python -c "from cryptography.fernet import Fernet; '
        'print(Fernet.generate_key().decode())")'
    )
for _position, _key in enumerate(TARGET_SECRET_KEY, start=1):
    try:
        Fernet(_key)
    except ValueError:
        raise ImproperlyConfigured(
            f"TARGET_SECRET_KEY: key {_position} is not a Fernet key "
            "(32 url-safe base64-encoded bytes)"
        ) from None

# The audit chain's key (settings.py): never derived here, and long enough not to be guessed.
AUDIT_CHAIN_KEY = env.str("AUDIT_CHAIN_KEY", default="")
if len(AUDIT_CHAIN_KEY) < 32:
    raise ImproperlyConfigured(
        "AUDIT_CHAIN_KEY must be set in production to a secret of at least 32 characters: it "
        "keys the audit trail's hash chain (python -c \"import secrets; "
        'print(secrets.token_urlsafe(48))"); never change it once events exist'
    )

SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=True)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31536000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = True
SECURE_HSTS_PRELOAD = True
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
