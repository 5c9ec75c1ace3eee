import factory
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission

from migrations_ops.models import Environment, Target


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    is_staff = True
    password = factory.django.Password("correct horse battery staple")

    @factory.post_generation
    def permissions(self, create, extracted, **kwargs):
        """``UserFactory(permissions=["migrations_ops.force_unlock_target", ...])``."""
        for dotted in extracted or ():
            app_label, codename = dotted.split(".")
            self.user_permissions.add(
                Permission.objects.get(content_type__app_label=app_label, codename=codename)
            )


def member(role: str, username: str | None = None, **fields):
    """A user in the console's group ``role`` (migrations_ops/roles.py; the ``roles`` fixture
    makes sure the groups exist)."""
    from django.contrib.auth.models import Group

    user = UserFactory(**({"username": username} if username else {}), **fields)
    user.groups.add(Group.objects.get(name=role))
    return user


ON_CALL_PERMISSIONS = [
    "migrations_ops.view_target",
    "migrations_ops.force_unlock_target",
    "migrations_ops.view_operation",
    "migrations_ops.view_auditevent",
]


class TargetFactory(factory.django.DjangoModelFactory):
    """A Target row. Pass ``db=`` a ``tests.targets.TargetDB`` to point it at a real database."""

    class Meta:
        model = Target
        exclude = ("db",)

    db = None
    name = factory.Sequence(lambda n: f"target-{n}")
    environment = Environment.STAGING
    convention = "runbook"
    connection_url = factory.LazyAttribute(
        lambda o: o.db.url if o.db else "sqlite:////nonexistent.sqlite3"
    )
    schema = factory.LazyAttribute(lambda o: (o.db.schema or "") if o.db else "")
    lock_timeout_seconds = 60


class IncidentFactory(factory.django.DjangoModelFactory):
    """An Incident row as it stands, with no timeline; ``services.open_incident`` opens one
    the way people do."""

    class Meta:
        model = "incidents.Incident"

    title = factory.Sequence(lambda n: f"incident {n}")
    scenario = "migration_failure"
    severity = "sev2"
    opened_by = "tests"
