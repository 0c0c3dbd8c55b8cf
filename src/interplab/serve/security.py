"""Who may use the server: the bind check, the API key, the body size limit.

`Guard` is a plain ASGI middleware (so streaming responses pass through untouched): every
route under /v1 and /api needs `Authorization: Bearer KEY` when a key is set (compared with
`secrets.compare_digest`, in constant time), and a request body larger than `max_body` bytes
is refused with 413 before it is read whole. The page itself (/, /static) is public: it holds
no data and asks for the key.
"""

from __future__ import annotations

import ipaddress
import json
import secrets

from interplab.errors import UserInputError
from interplab.serve.schemas import error_body

PROTECTED = ("/v1/", "/api/")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, insecure_public: bool) -> None:
    """Refuse to listen beyond this machine without a key, unless the user insists."""
    if is_loopback(host) or api_key or insecure_public:
        return
    raise UserInputError(
        f"refusing to listen on {host} without an API key: anyone who can reach this machine could use "
        "the model. Set --api-key (or INTERPLAB_API_KEY), bind 127.0.0.1, or pass --insecure-public."
    )


class _TooLarge(Exception):
    pass


class Guard:
    def __init__(self, app, *, api_key: str | None, max_body: int) -> None:
        self.app, self.max_body = app, max_body
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        # CORS preflights carry no credentials by design; they reach no route's data
        preflight = scope.get("method") == "OPTIONS"
        if self.api_key is not None and path.startswith(PROTECTED) and not preflight and not self._authorized(scope):
            return await _answer(send, 401, "missing or wrong API key: send the header "
                                            "'Authorization: Bearer KEY'", "authentication_error", "invalid_api_key")
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await _answer(send, 413, f"the request body is {length} bytes; the limit is {self.max_body}",
                                 "invalid_request_error", "body_too_large")
        received, started = 0, False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _TooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _answer(send, 413, f"the request body is larger than {self.max_body} bytes",
                              "invalid_request_error", "body_too_large")

    def _authorized(self, scope) -> bool:
        header = _header(scope, b"authorization") or ""
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key)


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _answer(send, status: int, message: str, type: str, code: str) -> None:
    body = json.dumps(error_body(message, type, None, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
