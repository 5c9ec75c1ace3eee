import pytest

from migrations_ops.actors import Actor
from migrations_ops.models import Door
from tests.factories import UserFactory

COMMANDER_PERMISSIONS = ["incidents.add_incident", "incidents.change_incident"]


@pytest.fixture
def commander(db):
    return Actor.for_user(
        UserFactory(username="commander", permissions=COMMANDER_PERMISSIONS), Door.ADMIN
    )
