from django.urls import path, re_path

from migrations_ops import api

app_name = "migrations_ops_api"

urlpatterns = [
    path("openapi.json", api.openapi_document, name="openapi"),
    path("migrations/status", api.migrations_status, name="migrations-status"),
    path("migrations/health", api.migrations_health, name="migrations-health"),
    path("targets/<slug:name>/flags", api.target_flags, name="target-flags"),
    path("targets/<slug:name>/force-unlock", api.force_unlock, name="force-unlock"),
    path("operations/<int:operation_id>", api.operation_detail, name="operation"),
    path(
        "operations/<int:operation_id>/approve",
        api.decide_operation,
        {"decision": "approve"},
        name="operation-approve",
    ),
    path(
        "operations/<int:operation_id>/reject",
        api.decide_operation,
        {"decision": "reject"},
        name="operation-reject",
    ),
    # Last: any other URL under /api/ is a JSON 404, as every error here is JSON.
    re_path(r"^(?P<unmatched>.*)$", api.not_found, name="not-found"),
]
