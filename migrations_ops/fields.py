"""A model field whose value is stored encrypted, so a dump of the console's database does not
give away the secrets in it (target connection URLs and their passwords)."""

from __future__ import annotations

import functools

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import models

# Marks a stored value as encrypted; a value without it was written before encryption began
# (migration 0012 encrypts those) and is read as it is.
PREFIX = "fernet:"
# What an encrypted field's admin display is looked up against: equal to no value.
NEVER_SHOWN = object()


class SecretKeyError(ImproperlyConfigured):
    """TARGET_SECRET_KEY is missing, malformed, or does not open what is stored."""


@functools.lru_cache(maxsize=4)
def _fernet_for(keys: tuple[str, ...]) -> MultiFernet:
    if not keys:
        raise SecretKeyError(
            "TARGET_SECRET_KEY is not set: it encrypts the targets' connection URLs "
            '(python -c "from cryptography.fernet import Fernet; '
            'print(Fernet.generate_key().decode())")'
        )
    fernets = []
    for position, key in enumerate(keys, start=1):
        try:
            fernets.append(Fernet(key))
        except ValueError:
            raise SecretKeyError(
                f"TARGET_SECRET_KEY: key {position} is not a Fernet key "
                "(32 url-safe base64-encoded bytes)"
            ) from None
    return MultiFernet(fernets)


def fernet() -> MultiFernet:
    """The keys of TARGET_SECRET_KEY: the first encrypts, each of them decrypts."""
    return _fernet_for(tuple(settings.TARGET_SECRET_KEY))


def is_encrypted(stored: str) -> bool:
    return stored.startswith(PREFIX)


def encrypt(text: str) -> str:
    return PREFIX + fernet().encrypt(text.encode()).decode()


def decrypt(stored: str) -> str:
    if not is_encrypted(stored):
        return stored
    try:
        return fernet().decrypt(stored.removeprefix(PREFIX).encode()).decode()
    except InvalidToken:
        raise SecretKeyError(
            "a stored connection URL cannot be decrypted: TARGET_SECRET_KEY no longer holds "
            "the key it was encrypted with (keep the old key after the new one until "
            "`ops rotate-secrets` has run)"
        ) from None


class EncryptedTextField(models.TextField):
    """Text encrypted with TARGET_SECRET_KEY (Fernet: AES with an HMAC) when written and
    decrypted when read: Python code sees the plain text, the database only ciphertext, and
    so do ``dumpdata`` files. Each write encrypts anew, so the column cannot be searched or
    compared with ``=``."""

    description = "Text stored encrypted"

    def from_db_value(self, value, expression, connection):
        return value if value is None else decrypt(value)

    def to_python(self, value):
        if isinstance(value, str):
            return decrypt(value)
        return super().to_python(value)

    def get_prep_value(self, value):
        value = super().get_prep_value(value)
        if not value or is_encrypted(value):
            return value
        return encrypt(value)

    @property
    def flatchoices(self):
        # Django's admin shows a field read-only (a change page seen without the change
        # permission, readonly_fields, a list column) through display_for_field, which first
        # looks the value up in flatchoices. No value is ever found there, so every such page,
        # one added later included, shows the admin's empty value "-", never the plain text.
        # (A field without choices: forms, validation and filters do not read flatchoices.)
        return [(NEVER_SHOWN, "")]

    def value_to_string(self, obj):
        # Serialised (dumpdata) as stored: encrypted. to_python reads it back.
        value = self.value_from_object(obj)
        return value if not value else encrypt(value)
