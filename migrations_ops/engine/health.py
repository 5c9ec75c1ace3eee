"""Ask an application's health endpoint whether it responds: one HTTP GET, bounded in time.

It lives in the engine because, like the rest of the engine, it reaches out to a target's
systems and imports nothing from Django; the incidents checklist (``API endpoints responding``)
is its first user. What it reports names the URL masked (``mask_url``): a health URL may carry
a token.
"""

from __future__ import annotations

import base64
import http.client
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from urllib.parse import unquote

from .target_url import mask_url

USER_AGENT = "opsconsole-health-check"


@dataclass(frozen=True)
class HealthAnswer:
    """What a health endpoint answered: ``status`` is None when no HTTP answer came."""

    url: str  # masked
    status: int | None
    elapsed_ms: int
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def describe(self) -> str:
        if self.status is not None:
            return f"{self.url} answered {self.status} in {self.elapsed_ms} ms"
        return f"{self.url} {self.error}"


def probe(url: str, timeout: float) -> HealthAnswer:
    """GET ``url`` (redirects followed); 2xx means the application responds. Never raises for
    what the network or the application does: a refusal, a time-out or an error status is
    the answer."""
    shown = mask_url(url)
    started = time.monotonic()

    def answer(status: int | None = None, error: str = "") -> HealthAnswer:
        elapsed_ms = round((time.monotonic() - started) * 1000)
        return HealthAnswer(shown, status, elapsed_ms, error)

    parts = urllib.parse.urlsplit(url)
    # urllib also opens file: and ftp: URLs; only HTTP is asked (hence the S310 waivers).
    if parts.scheme not in ("http", "https"):
        return answer(error="is not an http(s) URL")
    headers = {"User-Agent": USER_AGENT}
    if parts.username is not None:  # urllib takes user:password@ for part of the host name
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers["Authorization"] = f"Basic {base64.b64encode(credentials.encode()).decode()}"
        url = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    request = urllib.request.Request(url, headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return answer(response.status)
    except urllib.error.HTTPError as error:  # 4xx, 5xx: an answer all the same
        error.close()
        return answer(error.code)
    except urllib.error.URLError as error:
        return answer(error=_reason(error.reason, timeout))
    except TimeoutError:
        return answer(error=f"did not answer within {timeout:g} s")
    except (OSError, http.client.HTTPException, ValueError) as error:
        return answer(error=f"could not be asked: {_one_line(error)}")


def _reason(reason: object, timeout: float) -> str:
    if isinstance(reason, TimeoutError):
        return f"did not answer within {timeout:g} s"
    if isinstance(reason, ConnectionRefusedError):
        return "refused the connection"
    if isinstance(reason, socket.gaierror):
        return f"could not be resolved: {_one_line(reason)}"
    return f"could not be reached: {_one_line(reason)}"


def _one_line(error: object) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__
