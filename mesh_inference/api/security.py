"""Who may use the HTTP gateway: Host and Origin checks, JSON-only POSTs, the console login.

Public API::

    policy = AccessPolicy.of(console_token, own_host_names(http_host, extra), api_key)
    app = web.Application(middlewares=[guard]); app[POLICY_KEY] = policy
    add_login_routes(app)            # GET /api/session, POST /api/login, POST /api/logout
    has_access(request)              # proved the console token (cookie, bearer, ?token=)
    public_view(data)                # ``data`` without secrets (join token -> null)

Threats, and what stops them (as in Jupyter):

* *DNS rebinding*: a web page whose name resolves to 127.0.0.1 reads our
  responses as same-origin. Its requests carry its own name in ``Host``, so
  only loopback names, this machine's own names and addresses, and names
  the user configured are served (403 otherwise).
* *Cross-site requests*: a page elsewhere POSTs a form or a no-cors fetch.
  A POST must be ``application/json`` (a form cannot send it, and a JSON
  fetch needs a CORS preflight we never grant), and a present ``Origin``
  must equal our own on state-changing and status/event routes.
* *Secrets*: the join token is the mesh secret. It is shown, and the model
  routes act, only for a request that proves the console login token:
  ``<state-dir>/console-token``, which the CLI prints in the console URL.
  Visiting that URL sets an HttpOnly, SameSite=Strict cookie.

* *The API on a network*: with an API key (``--api-key``), ``/v1/*`` needs
  ``Authorization: Bearer <key>`` (compared in constant time; 401
  ``invalid_api_key`` otherwise). The node refuses a non-loopback
  ``--http-host`` without a key unless told ``--insecure-public``
  (:func:`public_bind_problem`). The console's own routes keep the login;
  peers' Tasks never come here (they proved the mesh secret).

``/health`` and the status JSON without secrets stay open; so do ``/v1/*``
and ``/metrics`` when no API key is set (with one, ``/metrics`` needs it too).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import hdrs, web
from multidict import MultiDict
from yarl import URL

from mesh_inference.api.openai import is_json_type, openai_error
from mesh_inference.machine.state import CONSOLE_TOKEN_RE

ACCESS_KEY = web.RequestKey("console_access", bool)
METRICS_PATH = "/metrics"  # Prometheus (api/metrics.py)
TOKEN_PARAM = "token"
MAX_TOKEN_LEN = 512
SECRET_KEYS = frozenset({"join_token"})
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Routes under /api/ that need no login; every other /api/ route does (deny by default).
OPEN_API = frozenset({"/api/status", "/api/events", "/api/session", "/api/login",
                      "/api/logout"})
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # a token URL must never leak in a Referer
    "X-Frame-Options": "DENY",  # no clickjacking of the console's buttons
    "Content-Security-Policy": "frame-ancestors 'none'",
}


@dataclass(frozen=True)
class AccessPolicy:
    """What the guard needs: the console token and the extra names this node answers to."""

    console_token: str
    allowed_hosts: frozenset[str] = frozenset()
    api_key: str | None = None  # --api-key: Bearer auth on /v1/*; None: /v1 is open

    def __post_init__(self) -> None:
        if not CONSOLE_TOKEN_RE.fullmatch(self.console_token):
            raise ValueError("the console token must be 32-512 URL-safe base64 characters")
        if self.api_key is not None:
            check_api_key(self.api_key)

    @classmethod
    def of(cls, console_token: str, allowed_hosts: Iterable[str] = (),
           api_key: str | None = None) -> AccessPolicy:
        """A policy with ``allowed_hosts`` normalized as Host headers are."""
        return cls(console_token,
                   frozenset(_normal_name(h) for h in allowed_hosts if h and h.strip()),
                   api_key)

    @property
    def cookie_name(self) -> str:
        # Cookies ignore ports: several nodes on one machine must not overwrite each
        # other's login, so the name is derived from (and reveals nothing of) the token.
        digest = hashlib.sha256(self.console_token.encode()).hexdigest()[:16]
        return f"mesh-inference-{digest}"

    def matches(self, candidate: str) -> bool:
        """Constant-time comparison (non-ASCII input must not raise)."""
        return hmac.compare_digest(candidate.encode(), self.console_token.encode())

    def api_key_matches(self, candidate: str | None) -> bool:
        """Whether ``candidate`` is the API key (constant time); true when none is set."""
        if self.api_key is None:
            return True
        # Undecodable header bytes arrive as surrogates: compare them, never raise.
        given = (candidate or "").encode("utf-8", "surrogatepass")
        return hmac.compare_digest(given, self.api_key.encode())


def check_api_key(key: str) -> str:
    """``key`` if it can be an API key (1-512 visible ASCII characters), else ValueError."""
    if not 0 < len(key) <= MAX_TOKEN_LEN or not all("!" <= c <= "~" for c in key):
        raise ValueError("the API key must be 1-512 visible ASCII characters (no spaces)")
    return key


def public_bind_problem(http_host: str, api_key: str | None, insecure_public: bool) -> str | None:
    """Why serving the API on ``http_host`` is refused (a public address without an API
    key and without ``--insecure-public``), or None when it may start."""
    if api_key is not None or insecure_public or is_loopback(_normal_name(http_host)):
        return None
    return (f"--http-host {http_host or '(all addresses)'} is not a loopback address, so the "
            "OpenAI API would be open to the network without a key: set --api-key-file PATH "
            "(or --api-key KEY, or MESH_INFERENCE_API_KEY), or pass --insecure-public to "
            "serve it without one")


POLICY_KEY = web.AppKey("access_policy", AccessPolicy)


# ---------------------------------------------------------------------- hosts
def split_host(value: str) -> tuple[str, int | None] | None:
    """``Host`` header → (lower-case name or address, port); ``None`` if malformed."""
    value = value.strip().lower()
    if not value or len(value) > 300:
        return None
    port_text: str | None = None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                return None
            port_text = rest[1:]
    elif value.count(":") == 1:
        name, port_text = value.split(":")
    elif ":" in value:
        return None  # a bare IPv6 address must be bracketed in a Host header
    else:
        name = value
    port: int | None = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            return None
        port = int(port_text)
    name = name.rstrip(".")
    return (name, port) if name else None


def _normal_name(name: str) -> str:
    name = name.strip().lower().strip("[]").rstrip(".")
    try:
        return str(ipaddress.ip_address(name.split("%", 1)[0]))
    except ValueError:
        return name


def is_loopback(name: str) -> bool:
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_allowed(host_header: str | None, allowed: frozenset[str]) -> bool:
    if host_header is None:
        # Browsers always send Host; only a non-browser client omits it (HTTP/1.0).
        return True
    parsed = split_host(host_header)
    if parsed is None:
        return False
    name = _normal_name(parsed[0])
    return is_loopback(name) or name in allowed


def own_host_names(http_host: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The names and addresses this node can be reached by, besides loopback.

    ``http_host`` (unless a wildcard), every interface address, the host name
    (and its mDNS ``.local`` form), and ``extra`` (``--allow-host`` names, the
    advertised address).
    """
    import psutil  # only here: the gateway itself does not need it

    names = {_normal_name(n) for n in extra if n and n.strip()}
    if http_host not in ("", "0.0.0.0", "::"):
        names.add(_normal_name(http_host))
    hostname = socket.gethostname().lower()
    if hostname:
        names |= {hostname, f"{hostname.split('.', 1)[0]}.local"}
    for snics in psutil.net_if_addrs().values():
        for snic in snics:
            if snic.family in (socket.AF_INET, socket.AF_INET6):
                names.add(_normal_name(snic.address))
    names.discard("0.0.0.0")
    names.discard("::")
    return frozenset(names)


def same_origin(origin: str, host_header: str | None, scheme: str) -> bool:
    """Whether a browser's ``Origin`` is this very server (scheme, host and port)."""
    if host_header is None:
        return False
    try:
        url = URL(origin)
    except ValueError:
        return False
    if url.scheme != scheme or url.host is None or url.path not in ("", "/"):
        return False  # also "null": sandboxed frames, file:// pages
    parsed = split_host(host_header)
    if parsed is None:
        return False
    default = 443 if scheme == "https" else 80
    ours = (_normal_name(parsed[0]), parsed[1] or default)
    theirs = (_normal_name(url.host), url.explicit_port or default)
    return ours == theirs


# ---------------------------------------------------------------------- access
def _bearer(request: web.Request) -> str | None:
    auth = request.headers.get(hdrs.AUTHORIZATION)
    if auth is None:
        return None
    scheme, _, value = auth.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def _presented(request: web.Request) -> str | None:
    """The token a request presents explicitly (bearer or ``?token=``), if any."""
    token = _bearer(request)
    if token is None:
        token = request.query.get(TOKEN_PARAM)
    return token


def has_access(request: web.Request) -> bool:
    """Set by :func:`guard`; false for a request that did not pass through it."""
    return request.get(ACCESS_KEY) is True


def public_view(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with every secret field set to null (for requests without the login)."""
    if not SECRET_KEYS & data.keys():
        return data
    return {k: (None if k in SECRET_KEYS else v) for k, v in data.items()}


def _error(status: int, message: str, code: str) -> web.Response:
    kind = "authentication_error" if status == 401 else "invalid_request_error"
    return openai_error(status, message, kind, code)


def _api_key_refused(missing: bool) -> web.Response:
    # As OpenAI answers: 401, invalid_request_error / invalid_api_key, and the challenge.
    message = ("this node's API needs an API key: send 'Authorization: Bearer <key>' "
               "(the key the node was started with, --api-key)" if missing
               else "incorrect API key provided")
    resp = openai_error(401, message, "invalid_request_error", "invalid_api_key")
    resp.headers[hdrs.WWW_AUTHENTICATE] = "Bearer"
    return resp


def _console_path(path: str) -> bool:
    return not (path.startswith(("/api/", "/v1/")) or path in ("/v1", "/health", METRICS_PATH))


def _set_login_cookie(resp: web.StreamResponse, policy: AccessPolicy) -> None:
    # No Max-Age: a session cookie. SameSite=Strict: never sent by another site's page.
    resp.set_cookie(policy.cookie_name, policy.console_token, httponly=True,
                    samesite="Strict", path="/")


_BAD_LINK_PAGE = """<!doctype html><meta charset="utf-8"><title>mesh-inference</title>
<body style="font:15px system-ui;background:#0e1116;color:#e6edf3;padding:40px">
<h2>This login link is not valid for this node</h2>
<p>The token in it is wrong. Open the console URL that <code>mesh-inference</code> printed
when it started (it carries the login token), or <a style="color:#7c9cff" href="/">open
the console</a> and paste the token from <code>&lt;state-dir&gt;/console-token</code>.</p>
"""


def _login_redirect(request: web.Request, policy: AccessPolicy) -> web.Response:
    """Set the cookie and send the browser to the same URL without the token."""
    query = MultiDict((k, v) for k, v in request.query.items() if k != TOKEN_PARAM)
    # A path-only Location; collapsing leading slashes keeps "//evil.example" from
    # becoming a protocol-relative redirect to another site.
    path = "/" + request.path.lstrip("/\\")
    location = str(URL.build(path=path, query=query, encoded=False))
    resp = web.Response(status=302, headers={hdrs.LOCATION: location})
    _set_login_cookie(resp, policy)
    return resp


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every HTTP request passes here first; see the module docstring."""
    policy = request.app[POLICY_KEY]
    host = request.headers.get(hdrs.HOST)
    if not host_allowed(host, policy.allowed_hosts):
        return _error(403, f"this node does not answer to the host name {host!r}; "
                      "use 127.0.0.1 or start it with --allow-host NAME", "host_not_allowed")
    path, method = request.path, request.method
    origin = request.headers.get(hdrs.ORIGIN)
    origin_checked = method not in SAFE_METHODS or path.startswith("/api/")
    if origin is not None and origin_checked and not same_origin(origin, host, request.scheme):
        return _error(403, f"cross-origin request from {origin[:100]!r} refused",
                      "cross_origin")
    is_api = path.startswith("/v1/") or path == "/v1"
    # /metrics is open like /health, but with an API key a scraper must send it too
    # (Prometheus cannot log in: bearer_token / authorization in its scrape config).
    is_api = is_api or (path == METRICS_PATH and policy.api_key is not None)
    if is_api and not policy.api_key_matches(_bearer(request)):
        return _api_key_refused(_bearer(request) is None)
    if method in BODY_METHODS and not is_json_type(request.headers.get(hdrs.CONTENT_TYPE)):
        return _error(415, "the request body must be application/json",
                      "unsupported_media_type")
    granted = False
    if not is_api:
        # On /v1 the Authorization header is an OpenAI API key, not our login.
        presented = _presented(request)
        if presented is not None:
            if not policy.matches(presented[:MAX_TOKEN_LEN]):
                if _console_path(path):
                    return web.Response(status=401, text=_BAD_LINK_PAGE,
                                        content_type="text/html")
                return _error(401, "wrong console token", "invalid_token")
            granted = True
            if _console_path(path) and method == "GET" and TOKEN_PARAM in request.query:
                return _login_redirect(request, policy)
        else:
            cookie = request.cookies.get(policy.cookie_name)
            # A stale cookie is normal (a reset state dir): just not logged in.
            granted = cookie is not None and policy.matches(cookie[:MAX_TOKEN_LEN])
    request[ACCESS_KEY] = granted
    if path.startswith("/api/") and path not in OPEN_API and not granted:
        return _error(401, "log in to the console first: open the URL that mesh-inference "
                      "printed (it carries a login token), or send "
                      "'Authorization: Bearer <state-dir/console-token>'", "login_required")
    return await handler(request)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


# ---------------------------------------------------------------------- login routes
async def session(request: web.Request) -> web.Response:
    data = {"authenticated": has_access(request)}
    if request.app[POLICY_KEY].api_key is not None:
        # The console then asks for the key for its chat (no secret: every /v1 401 says so).
        data["api_key_required"] = True
    return web.json_response(data, headers={"cache-control": "no-store"})


async def login(request: web.Request) -> web.Response:
    """``{"token": "…"}`` (pasted in the console) → the login cookie."""
    policy = request.app[POLICY_KEY]
    try:
        body = json.loads(await request.read())
    except (UnicodeDecodeError, ValueError):
        return _error(400, "request body is not valid JSON", "invalid_request")
    token = body.get("token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token.strip() or len(token) > MAX_TOKEN_LEN:
        return openai_error(400, "body must be an object with a string 'token'",
                            "invalid_request_error", "invalid_request", "token")
    if not policy.matches(token.strip()):
        return _error(401, "wrong console token", "invalid_token")
    resp = web.json_response({"authenticated": True})
    _set_login_cookie(resp, policy)
    return resp


async def logout(request: web.Request) -> web.Response:
    resp = web.json_response({"authenticated": False})
    resp.del_cookie(request.app[POLICY_KEY].cookie_name, path="/")
    return resp


def install(app: web.Application, policy: AccessPolicy) -> None:
    """Put the guard in front of every route of ``app`` and add the login routes."""
    app[POLICY_KEY] = policy
    app.middlewares.append(guard)
    app.on_response_prepare.append(_security_headers)
    app.router.add_get("/api/session", session)
    app.router.add_post("/api/login", login)
    app.router.add_post("/api/logout", logout)

