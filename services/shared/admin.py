"""Authentication of the state-changing HTTP endpoints (``POST /symbols`` on ingest, ``POST /clock`` on a test
aggregator): one guard that :class:`~services.shared.lifecycle.HealthServer` puts in front of every route whose
method is not GET, HEAD or OPTIONS. ``/healthz``, ``/readyz``, ``/metrics`` and every read-only route stay open.

The rules, in the order they are checked:

1. a token is configured (``service.admin_token_file``, the file's content, read once at start): the request must
   carry ``Authorization: Bearer <token>``; a missing, malformed or wrong one is answered 401 with
   ``WWW-Authenticate: Bearer``. The comparison is :func:`hmac.compare_digest`, and it runs even when the header
   is missing, so the answer's timing says nothing about the token;
2. no token, and the server listens on loopback only (``127.0.0.1``, ``::1``, ``localhost``: the local run):
   the route is open, as on a developer's machine nothing else can reach it;
3. no token, and the server listens on another address (``0.0.0.0`` in compose and Kubernetes): the route is
   off, 403 with one line naming the setting.

Each refusal (401 or 403) is logged at WARNING with the remote address (never the token) and counted in
``admin_auth_failures`` (``/metrics.json``; ``klines_<service>_admin_auth_failures_total`` on ``/metrics``).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from pydantic import SecretStr

from services.shared.logs import log_event

log = logging.getLogger("services.shared.admin")

#: Methods that never change state: served without the guard.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

SETTING = "service.admin_token_file"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def read_token_file(path: Path) -> SecretStr:
    """The token in ``path`` (surrounding whitespace, such as a final newline, removed).

    Raises :class:`ValueError` with one line when the file cannot be read or holds no token.
    """
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the admin token file {path}: {exc.__class__.__name__}") from None
    if not token:
        raise ValueError(f"the admin token file {path} is empty")
    return SecretStr(token)


def bearer_token_matches(authorization: str | None, expected: SecretStr) -> bool:
    """Whether an ``Authorization`` header carries ``expected`` as a bearer token.

    The scheme is case-insensitive (RFC 7235) and spaces around and between the parts are tolerated. The
    comparison is constant-time, and it is made even when the header is missing or malformed (against an empty
    candidate), so every refusal takes the same path.
    """
    candidate = b""
    parts = (authorization or "").split(None, 1)
    scheme_ok = len(parts) == 2 and parts[0].lower() == "bearer"
    if scheme_ok:
        candidate = parts[1].strip().encode("utf-8", "backslashreplace")
    secret = expected.get_secret_value().encode("utf-8")
    matches = hmac.compare_digest(candidate, secret)
    return scheme_ok and bool(secret) and matches


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` makes the server reachable from this machine only."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # "", "0.0.0.0"-like names, hostnames: assume reachable from elsewhere


class AdminGuard:
    """The check in front of the state-changing routes of one HTTP server (see the module docstring)."""

    def __init__(self, host: str, token: SecretStr | None) -> None:
        self.token = token
        self.open_without_token = token is None and is_loopback(host)
        self.failures = 0

    def wrap(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            refusal = self.refusal(request)
            return refusal if refusal is not None else await handler(request)

        return guarded

    def refusal(self, request: web.Request) -> web.Response | None:
        """None when ``request`` may go on; else the 401 or 403 answer (logged and counted)."""
        if self.token is None:
            if self.open_without_token:
                return None
            return self._refuse(
                request,
                403,
                f"state-changing endpoints are off: set {SETTING} (a file holding the bearer token) "
                "or bind service.http_host to 127.0.0.1",
                "no admin token configured",
            )
        header = request.headers.get("Authorization")
        if bearer_token_matches(header, self.token):
            return None
        reason = "missing bearer token" if header is None else "wrong or malformed bearer token"
        return self._refuse(request, 401, f"unauthorized: {reason}", reason)

    def _refuse(self, request: web.Request, status: int, message: str, reason: str) -> web.Response:
        self.failures += 1
        log_event(
            log,
            logging.WARNING,
            "admin request refused",
            status=status,
            reason=reason,
            method=request.method,
            path=request.path,
            remote=request.remote,
        )
        headers = {"WWW-Authenticate": 'Bearer realm="klines"'} if status == 401 else None
        return web.json_response({"ok": False, "error": message}, status=status, headers=headers)
