from django.urls import path

from migrations_ops import api

app_name = "migrations_ops_api"

urlpatterns = [
    path("migrations/status", api.migrations_status, name="migrations-status"),
]
