"""Who may call the server, checked before any route runs (a plain ASGI middleware):

0. the request head (line and headers) must fit max_header_bytes (431);
1. the Host header must name this server (DNS rebinding: a web page whose name resolves
   to 127.0.0.1 reaches a local server with its own name as Host);
2. a browser's Origin header, when there is one, must be allowed (a page on another site
   posting to a local server);
3. with an API key, `Authorization: Bearer <key>` (OpenAI-style 401 otherwise), on every
   route but /health and /metrics unless auth_all_routes;
4. POST bodies must be declared JSON (415 otherwise): a browser sends text/plain
   cross-origin without asking first, application/json only after a CORS preflight that
   this server never grants.

Every refusal is an OpenAI-style error body.
"""
import hmac
import re
from typing import Optional, Tuple
from urllib.parse import urlsplit

from starlette.responses import JSONResponse

from .args import ServerArgs
from .protocol import error_body

OPEN_PATHS = ("/health", "/metrics")
_ORIGIN = re.compile(r"([a-z][a-z0-9+.-]*)://(\[[0-9a-f:.]+\]|[^:/\[\]@]+)(?::(\d+|\*))?/?")
_DEFAULT_PORTS = {"http": "80", "https": "443"}


class Guard:
    def __init__(self, app, args: ServerArgs):
        self.app = app
        self.hosts = args.hosts()
        self.origins = [_split_origin(o) if o not in ("*", "null") else o for o in args.origins()]
        self.key = args.api_key.encode() if args.api_key else None
        self.auth_all = args.auth_all_routes
        self.max_head = args.max_header_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self.check(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, scope) -> Optional[JSONResponse]:
        headers, size = {}, len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        for k, v in scope["headers"]:
            headers.setdefault(k, v)  # the first of repeated headers (h11 refuses repeated Host)
            size += len(k) + len(v) + 4
        if size > self.max_head:  # h11 caps only a head that arrives in pieces
            return refuse(431, f"the request head has {size} bytes; this server takes at most {self.max_head} "
                               "(--max-header-bytes)", "header_too_large")
        host = headers.get(b"host")
        if host is not None and not self.host_ok(host.decode("latin-1")):
            return refuse(403, "this server does not answer to that Host name (see --allowed-hosts)",
                          "host_not_allowed")
        origin = headers.get(b"origin")
        if origin is not None and not self.origin_ok(origin.decode("latin-1")):
            return refuse(403, "cross-origin requests from this Origin are not allowed (see --allowed-origins)",
                          "origin_not_allowed")
        if self.key is not None and (self.auth_all or route_path(scope) not in OPEN_PATHS):
            refusal = self.check_key(headers.get(b"authorization"))
            if refusal is not None:
                return refusal
        if scope["method"] in ("POST", "PUT", "PATCH") and not is_json(headers.get(b"content-type")):
            return refuse(415, "the request body must be JSON, sent with 'Content-Type: application/json'",
                          "unsupported_media_type")
        return None

    def host_ok(self, host: str) -> bool:
        if "*" in self.hosts:
            return True
        try:
            name = urlsplit("//" + host).hostname
        except ValueError:
            return False
        if not name:
            return False
        name = name.rstrip(".")
        return any(name == h.strip("[]") or (h.startswith("*.") and name.endswith(h[1:])) for h in self.hosts)

    def origin_ok(self, origin: str) -> bool:
        origin = origin.strip().lower()
        if "*" in self.origins or (origin == "null" and "null" in self.origins):
            return True
        parts = _split_origin(origin)
        if parts is None:
            return False
        for allowed in self.origins:
            if isinstance(allowed, tuple) and allowed[:2] == parts[:2] and allowed[2] in ("*", parts[2]):
                return True
        return False

    def check_key(self, authorization: Optional[bytes]) -> Optional[JSONResponse]:
        if not authorization:
            return refuse(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.", None,
                          headers={"www-authenticate": "Bearer"})
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            return refuse(401, "Incorrect API key provided.", "invalid_api_key", headers={"www-authenticate": "Bearer"})
        return None


def refuse(status: int, message: str, code: Optional[str], headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(error_body(message, None, code), status_code=status, headers=headers)


def route_path(scope) -> str:
    """The path inside this app (a mount's prefix taken off)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def is_json(content_type: Optional[bytes]) -> bool:
    if not content_type:
        return False
    media, *params = content_type.decode("latin-1").lower().split(";")
    if media.strip() != "application/json":
        return False
    for p in params:
        name, _, value = p.partition("=")
        if name.strip() == "charset" and value.strip().strip('"') not in ("utf-8", "utf8"):
            return False
    return True


def _split_origin(origin: str) -> Optional[Tuple[str, str, str]]:
    """'http://localhost:8000' -> ('http', 'localhost', '8000'); a port may be '*'."""
    m = _ORIGIN.fullmatch(origin.strip().lower())
    if m is None:
        return None
    scheme, host, port = m.groups()
    return scheme, host.strip("[]"), port or _DEFAULT_PORTS.get(scheme, "")
