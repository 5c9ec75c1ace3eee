"""GET /api/openapi.json describes every endpoint, and errors under /api/ are always JSON."""

import json
import re

import pytest
from django.urls import URLPattern, URLResolver, get_resolver, path
from openapi_spec_validator import validate

pytestmark = pytest.mark.django_db


def api_urls() -> list[str]:
    """Every URL pattern of the site as OpenAPI writes it (``/api/targets/{name}/flags``)."""
    found = []

    def walk(patterns, prefix):
        for pattern in patterns:
            route = prefix + str(pattern.pattern)
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns, route)
            elif isinstance(pattern, URLPattern):
                found.append((route, pattern.name))

    walk(get_resolver().url_patterns, "/")
    return [
        re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", route)
        for route, name in found
        if (route.startswith("/api/") or route == "/metrics") and name != "not-found"
    ]


def test_the_document_is_valid_openapi_3_1_and_describes_every_api_url(client):
    response = client.get("/api/openapi.json")

    assert response.status_code == 200
    document = json.loads(response.content)
    validate(document)
    assert document["openapi"].startswith("3.1")
    urls = api_urls()
    assert "/api/targets/{name}/flags" in urls and "/api/migrations/health" in urls
    assert sorted(set(urls) - set(document["paths"])) == []
    assert sorted(set(document["paths"]) - set(urls)) == []


def test_the_document_names_both_ways_in_and_the_error_shape(client):
    document = client.get("/api/openapi.json").json()

    schemes = document["components"]["securitySchemes"]
    assert schemes["bearerToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["bearerToken"]["description"],
    }
    assert schemes["staffSession"]["in"] == "cookie"
    error = document["components"]["schemas"]["Error"]
    assert error["properties"]["error"]["required"] == ["code", "message"]
    flags = document["paths"]["/api/targets/{name}/flags"]["get"]["responses"]
    assert {"200", "304", "401", "403", "404"} <= set(flags)
    health = document["paths"]["/api/migrations/health"]["get"]["responses"]
    assert {"200", "503"} <= set(health)


@pytest.mark.parametrize("url", ["/api/nope", "/api/targets/orders-db", "/api/migrations/status/"])
def test_an_unknown_api_url_is_a_json_404(client, url):
    response = client.get(url)
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "not_found"
    assert url in response.json()["error"]["message"]


def failing_view(request):
    raise RuntimeError("boom")


urlpatterns = [path("api/failing", failing_view), *get_resolver("opsconsole.urls").url_patterns]
handler500 = "opsconsole.views.server_error"


def test_a_server_error_under_api_is_a_json_500(client, settings):
    settings.ROOT_URLCONF = __name__
    settings.DEBUG = False
    client.raise_request_exception = False

    response = client.get("/api/failing")

    assert response.status_code == 500
    assert response["Content-Type"] == "application/json"
    assert response.json() == {
        "error": {
            "code": "server_error",
            "message": "the console failed to answer; the error is in its log",
        }
    }
    assert "boom" not in response.content.decode()
