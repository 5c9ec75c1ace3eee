"""django-axes' login lock-outs in the admin, whose clean-up asks the delete permission."""

from __future__ import annotations

from axes.admin import AccessAttemptAdmin
from axes.models import AccessAttempt
from django.contrib import admin


class LoginAttemptAdmin(AccessAttemptAdmin):
    """django-axes' lock-outs, whose "Clean up expired attempts" deletes login records: only
    for those who may delete them (django-axes asks no permission for it)."""

    @admin.action(description="Clean up expired attempts", permissions=["delete"])
    def cleanup_expired_attempts(self, request, queryset):
        # django-axes stamps the attempt time on login requests only; "now" for this one.
        request.axes_attempt_time = getattr(request, "axes_attempt_time", None)
        return super().cleanup_expired_attempts(request, queryset)


admin.site.unregister(AccessAttempt)
admin.site.register(AccessAttempt, LoginAttemptAdmin)
