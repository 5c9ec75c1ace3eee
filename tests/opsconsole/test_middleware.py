"""Every request gets a request id and a client address, and the audit events it writes carry
them."""

import re

import pytest

from migrations_ops.models import AuditEvent
from opsconsole import middleware

pytestmark = pytest.mark.django_db

LOGIN = "/admin/login/"


def failed_login(client, **headers):
    """A request that writes an audit event: a login with a wrong password."""
    return client.post(LOGIN, {"username": "nobody", "password": "wrong"}, **headers)


def test_a_request_without_an_id_gets_a_new_one_echoed_in_the_response(client):
    response = failed_login(client, REMOTE_ADDR="198.51.100.7")

    request_id = response.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    event = AuditEvent.objects.get(action="user.login_failed")
    assert (event.request_id, event.ip) == (request_id, "198.51.100.7")


def test_a_sane_request_id_from_the_proxy_is_kept(client):
    response = failed_login(client, HTTP_X_REQUEST_ID="edge-7f3a:42")

    assert response.headers["X-Request-ID"] == "edge-7f3a:42"
    assert AuditEvent.objects.get(action="user.login_failed").request_id == "edge-7f3a:42"


@pytest.mark.parametrize(
    "offered", ["forged\nline", "a" * 65, "has space", "-starts-with-dash", "ünïcode"]
)
def test_a_request_id_that_is_not_sane_is_replaced(client, offered):
    response = failed_login(client, HTTP_X_REQUEST_ID=offered)

    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])
    assert AuditEvent.objects.get().request_id == response.headers["X-Request-ID"]


def test_x_forwarded_for_is_ignored_without_trusted_proxies(client):
    failed_login(client, REMOTE_ADDR="10.0.0.5", HTTP_X_FORWARDED_FOR="203.0.113.9")

    assert AuditEvent.objects.get().ip == "10.0.0.5"


def test_behind_a_trusted_proxy_the_address_it_saw_is_recorded(client, settings):
    settings.TRUSTED_PROXY_COUNT = 1
    # The client wrote the first entry itself; the proxy appended the second.
    failed_login(client, REMOTE_ADDR="10.0.0.5", HTTP_X_FORWARDED_FOR="192.0.2.66, 203.0.113.9")

    assert AuditEvent.objects.get().ip == "203.0.113.9"


def test_a_forwarded_value_that_is_no_address_falls_back_to_the_peer(rf, settings):
    settings.TRUSTED_PROXY_COUNT = 1
    request = rf.get("/", REMOTE_ADDR="10.0.0.5", HTTP_X_FORWARDED_FOR="not-an-ip")

    assert middleware.client_ip(request) == "10.0.0.5"


def test_nothing_of_a_request_is_left_behind_for_the_next_code(client):
    failed_login(client, HTTP_X_REQUEST_ID="req-1")

    assert middleware.current() == middleware.RequestContext()


def test_a_task_carries_its_own_id_and_no_address():
    middleware.bind_task("0b6f3c1e-task")
    try:
        assert middleware.current() == middleware.RequestContext(request_id="0b6f3c1e-task")
    finally:
        middleware.unbind_task()
    assert middleware.current() == middleware.RequestContext()


def test_a_message_waits_through_requests_that_do_not_show_it(client, django_user_model):
    """The message storage is built only for a request that uses it (LazyMessageMiddleware):
    a message added before a redirect still reaches the page that shows it."""
    admin = django_user_model.objects.create_superuser("root", "root@example.com", "pw-unused-1")
    client.force_login(admin)
    added = client.post("/admin/auth/group/add/", {"name": "night shift"})
    assert added.status_code == 302

    api = client.get("/api/migrations/status")  # staff session: the API never shows messages
    assert api.status_code == 200
    assert "messages" not in api.cookies

    shown = client.get(added.url)
    assert "night shift" in shown.content.decode()
    assert "was added successfully" in shown.content.decode()
    assert "was added successfully" not in client.get(added.url).content.decode()


# --- NUL characters in the address ----------------------------------------------------------------
@pytest.fixture
def superuser_client(client):
    from tests.factories import UserFactory

    client.force_login(UserFactory(username="root", is_superuser=True))
    client.raise_request_exception = False
    return client


@pytest.mark.parametrize(
    "url",
    [
        "/admin/migrations_ops/operation/?status=%00",
        "/admin/migrations_ops/operation/?q=%00",
        "/admin/migrations_ops/target/?environment__exact=%00",
        "/admin/incidents/incident/?severity=%00",
        "/admin/migrations_ops/auditevent/export/?q=%00",
        "/admin/migrations_ops/auditevent/?action=%00",
        "/admin/migrations_ops/operation/%00/change/",
        "/admin/migrations_ops/target/1%00/change/",
        "/admin/axes/accesslog/?path_info=%00",
        "/admin/?%00=1",
    ],
)
def test_a_nul_in_an_admin_address_is_a_400_page_saying_why(superuser_client, url):
    response = superuser_client.get(url)

    assert response.status_code == 400
    assert response["Content-Type"].startswith("text/html")
    assert b"NUL character" in response.content


@pytest.mark.parametrize(
    "url",
    ["/api/migrations/status?target=%00", "/api/targets/a%00b/flags", "/api/%00", "/metrics?%00"],
)
def test_a_nul_in_an_api_address_is_a_json_400(client, url):
    response = client.get(url)

    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and "NUL character" in error["message"]


def test_an_address_without_nul_passes(superuser_client):
    assert superuser_client.get("/admin/migrations_ops/operation/?status=queued").status_code == 200
