"""The HTTP layer's limits: a request body read under a size cap and a deadline, and
uvicorn run with read timeouts it does not have by itself.

uvicorn 0.54 closes idle keep-alive connections (timeout_keep_alive) and caps a request's
head (h11_max_incomplete_event_size), but waits forever for a head or a body that
arrives a byte at a time. GuardedH11 (uvicorn's h11 protocol) closes a connection whose
request head is not in within header_timeout, or whose body is not in within
body_timeout plus a grace second (the app's own reader answers 408 first when it reads
the body; the grace covers bodies no route reads). When the app answers before the body
is in (413, 408, 401, ...), the connection sends FIN and drops the rest of the body
without parsing it (a client looping 10 MB bodies would otherwise cost the server ~40 ms
of GIL-holding h11 work each), then closes.
"""
import asyncio
import json
import logging

from starlette.requests import ClientDisconnect, Request

from .args import ServerArgs
from .protocol import error_body

log = logging.getLogger("citer.serve")


class BodyError(Exception):
    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.code = status, code


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The whole body; BodyError 413 past `limit` bytes (at once when Content-Length says
    so), 408 when it is not in within `timeout` seconds; ClientDisconnect if the client left."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BodyError(413, f"the request body has {int(length)} bytes; this server takes at most {limit} "
                             "(--max-body-bytes)", "body_too_large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BodyError(413, f"the request body is over {limit} bytes, the most this server takes "
                                         "(--max-body-bytes)", "body_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise BodyError(408, f"the request body did not arrive within {timeout:g} s (--body-timeout)",
                        "body_timeout") from None
    return b"".join(chunks)


def guarded_h11(header_timeout: float, body_timeout: float):
    """uvicorn's h11 protocol with a deadline on each request's head and body."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        _phase = None
        _timer = None
        _lingering = False

        def connection_made(self, transport):
            super().connection_made(transport)
            self._watch()

        def connection_lost(self, exc):
            self._cancel()
            super().connection_lost(exc)

        def handle_events(self):
            super().handle_events()
            self._watch()

        def on_response_complete(self):
            if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
                # answered before the body was read (413, 408, 401, 415, ...): no next request on this
                # connection; drop the rest of the body unparsed (h11 would parse and copy every byte)
                self.server_state.total_requests += 1
                self._linger(body_timeout)
                return
            super().on_response_complete()
            self._watch()

        def _watch(self) -> None:
            """Arm the deadline of what the connection now waits for from the client: the
            next request's head (their state IDLE) or this request's body (SEND_BODY)."""
            state = self.conn.their_state
            phase = (id(self.cycle), state)
            if phase == self._phase:
                return
            self._phase = phase
            self._cancel()
            if state is h11.IDLE:
                self._timer = self.loop.call_later(header_timeout, self._expire, phase, "request head")
            elif state is h11.SEND_BODY:
                self._timer = self.loop.call_later(body_timeout + 1.0, self._expire, phase, "request body")

        def _cancel(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def send_400_response(self, msg: str) -> None:
            """A request h11 cannot parse (a head over max_header_bytes, bad framing): an
            OpenAI-style 400, then the connection closes (uvicorn's own sends plain text)."""
            body = json.dumps(error_body(f"invalid HTTP request: {msg}", code="invalid_http")).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self._linger(1.0)

        def _linger(self, seconds: float) -> None:
            """Close once the client has had the reply: send FIN, drop what it still sends
            without parsing it, close when it closes or after `seconds` (closing with its data
            unread would reset the connection, and the client could lose the reply)."""
            self._lingering = True
            self._cancel()
            self.flow.resume_reading()
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(seconds, self.transport.close)

        def data_received(self, data: bytes) -> None:
            if not self._lingering:
                super().data_received(data)

        def _expire(self, phase, what: str) -> None:
            self._timer = None
            if phase == self._phase and not self.transport.is_closing():
                log.info("closing a connection from %s: its %s did not arrive in time", self.client, what)
                self.transport.close()

    return GuardedH11


def run_server(app, args: ServerArgs) -> None:
    """Serve `app` with uvicorn under args' host, port and HTTP limits (blocks)."""
    import uvicorn

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            http=guarded_h11(args.header_timeout, args.body_timeout),
                            timeout_keep_alive=args.timeout_keep_alive,
                            h11_max_incomplete_event_size=args.max_header_bytes,
                            limit_concurrency=args.max_connections)
    uvicorn.Server(config).run()


__all__ = ["BodyError", "ClientDisconnect", "read_body", "guarded_h11", "run_server"]
