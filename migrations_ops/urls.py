from django.urls import path

from migrations_ops import api

app_name = "migrations_ops_api"

urlpatterns = [
    path("migrations/status", api.migrations_status, name="migrations-status"),
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
]
