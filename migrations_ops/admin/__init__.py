"""The admin door, one module per model family; importing it registers them all.

Thin, like every door: every write goes through ``services``. Django's autodiscover imports
this package; the imports below are what registers each family's admin on the site."""

from django.contrib import admin

from migrations_ops.admin import (  # noqa: F401  (registration is the import)
    history,
    logins,
    operations,
    schedules,
    scripts,
    targets,
    thresholds,
    tokens,
    users,
)

admin.site.site_header = "opsconsole"
admin.site.site_title = "opsconsole"
admin.site.index_title = "Operations console"
