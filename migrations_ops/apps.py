from django.apps import AppConfig


class MigrationsOpsConfig(AppConfig):
    name = "migrations_ops"
    verbose_name = "Migration operations"

    def ready(self) -> None:
        # Connects the API caches to target changes (services: "what the API serves from cache").
        from migrations_ops import checks, people, services  # noqa: F401

        # Every change of who may do what is audited, and checked, whichever door made it.
        people.connect()
