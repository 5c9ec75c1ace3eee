from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

from migrations_ops import metrics

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="admin:index", permanent=False)),
    path("admin/", admin.site.urls),
    path("api/", include("migrations_ops.urls")),
    path("metrics", metrics.metrics, name="metrics"),
]

# Errors under /api/ answer JSON (unknown URLs there: migrations_ops.urls ends in a JSON 404).
handler400 = "opsconsole.views.bad_request"
handler500 = "opsconsole.views.server_error"
