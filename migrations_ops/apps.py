from django.apps import AppConfig


class MigrationsOpsConfig(AppConfig):
    name = "migrations_ops"
    verbose_name = "Migration operations"

    def ready(self) -> None:
        # Connects the API caches to target changes (services: "what the API serves from cache").
        from migrations_ops import checks, services  # noqa: F401
