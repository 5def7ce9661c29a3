"""What every page of ours puts between a hostile network and the app: only this machine's Host
names and origins, no request smuggling, security headers, a logged 500 for a bug, and (in
uvicorn's protocol) header and idle timeouts and a cap on connections.

    app = Starlette(routes, middleware=[Middleware(Gatekeeper, bound_host=host,
                                                   allowed_origins=[])])
    uvicorn.Config(app, http=functools.partial(GuardedProtocol, header_timeout=10,
                                               max_connections=512))
"""
import contextlib
import ipaddress
import logging
import socket
import time
from urllib.parse import urlsplit

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from flower_classifier.serve.answers import RETRY_AFTER_S, error_response

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'self'; img-src 'self' blob: data:; "
     b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
]
# Set in a request's scope by Gatekeeper on a 413: a body the client is still sending is read and
# dropped before the connection closes (GuardedProtocol), at most DRAIN_BYTES and header_timeout.
DRAIN_KEY = "flower_classifier.drain_unread_body"
DRAIN_BYTES = 64_000_000
BUSY_CONNECTION_TEXT = b"The server has too many connections.\n"
BUSY_CONNECTION_ANSWER = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: %s\r\nContent-Type: text/plain\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
    % (RETRY_AFTER_S.encode(), len(BUSY_CONNECTION_TEXT), BUSY_CONNECTION_TEXT))


def lan_address():
    """This machine's address on its local network, for the phone (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            return probe.getsockname()[0]
        except OSError:
            return socket.gethostname()


def local_names(host):
    """Host names and addresses that mean this machine: a Host header naming anything else comes
    from a DNS-rebinding page or a misdirected client."""
    names = {"localhost", "127.0.0.1", "::1", host.lower()}
    hostname = socket.gethostname().lower()
    names |= {hostname, f"{hostname}.local", socket.getfqdn().lower()}
    with contextlib.suppress(OSError):
        names |= {info[4][0] for info in socket.getaddrinfo(hostname, None)}
    if host in ("0.0.0.0", "::"):
        names.add(lan_address())
    return names


def host_name(authority):
    """The host part of a Host header or origin's authority, lower case, without port or []."""
    host = authority.rsplit("@", 1)[-1].lower()
    if host.startswith("["):
        return host[1:host.find("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Gatekeeper:
    """ASGI middleware that serves only this machine's Host names and pages of its own origin
    (as Jupyter Server does, against DNS rebinding and cross-site posts), refuses requests with
    both Content-Length and Transfer-Encoding (RFC 9112 request smuggling), adds the security
    headers to every answer and turns a bug into a logged 500 that keeps the connection."""

    def __init__(self, app, bound_host, allowed_origins):
        self.app = app
        self.open_to_all = "*" in allowed_origins
        self.origins = {origin.rstrip("/").lower() for origin in allowed_origins}
        self.names = local_names(bound_host) | {host_name(urlsplit(origin).netloc)
                                                for origin in self.origins}
        self.any_address = bound_host in ("0.0.0.0", "::")

    def refusal(self, scope):
        headers = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        if "content-length" in headers and "transfer-encoding" in headers:
            return 400, ("The request has both Content-Length and Transfer-Encoding; send only "
                         "one.")
        if self.open_to_all:
            return None
        host = headers.get("host", "")
        if not self.is_local(host_name(host)):
            return 403, (f"This server does not answer to the name {host[:80]!r}; use its address, "
                         "or start it with --allow_origin for that name.")
        origin = headers.get("origin")
        if origin is not None and origin.lower() not in self.origins | {
                f"{scope.get('scheme', 'http')}://{host}".lower()}:
            return 403, (f"Requests from the web page at {origin[:80]!r} are refused; start the "
                         "server with --allow_origin for it.")
        return None

    def is_local(self, name):
        if name in self.names:
            return True
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return False
        # An address, not a name, cannot be rebound; only a loopback one or, when listening on
        # every interface, any address a client used to reach this machine.
        return address.is_loopback or self.any_address

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] == 413:  # refused unread: drain the rest, then close
                    scope[DRAIN_KEY] = True
                message = {**message, "headers": [*message.get("headers", []),
                                                  *SECURITY_HEADERS]}
            await send(message)

        refusal = self.refusal(scope)
        if refusal is not None:
            status, text = refusal
            answer = error_response(status, text, {"Connection": "close"})
            return await answer(scope, receive, send_with_headers)
        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            if started:
                raise  # too late for an answer: uvicorn logs it and closes the connection
            # A bug: logged once, with its traceback; the answer carries no exception text.
            logging.getLogger("uvicorn.error").exception("request %s %s failed",
                                                         scope["method"], scope["path"])
            answer = error_response(500, "The server failed on this request; try again, and "
                                    "report it if it keeps failing.")
            await answer(scope, receive, send_with_headers)


class DrainingTransport:
    """The connection's transport as uvicorn's request cycles see it: close() after a 413 whose
    body is still arriving starts the protocol's drain instead of closing at once (a close with
    unread bytes makes the kernel answer the sender with a reset, which a client still sending
    gets instead of the answer); while draining it counts as closing. The rest is the real
    transport's."""

    def __init__(self, transport, protocol):
        self.transport, self.protocol = transport, protocol

    def close(self):
        if not self.protocol.drain_instead_of_close():
            self.transport.close()

    def is_closing(self):
        return self.protocol.draining or self.transport.is_closing()

    def __getattr__(self, name):
        return getattr(self.transport, name)


class GuardedProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol plus what it lacks against slow and idle clients: a connection
    must send a request's headers within header_timeout of opening or of its last answer, and
    past max_connections the oldest idle connection is closed for a new one (503 when none is
    idle). A body left unread after an early answer (413) is drained, read and dropped, for up
    to header_timeout and DRAIN_BYTES, before the connection closes (on a kept-alive connection
    uvicorn drops it until the next request), so a client that sends everything before reading
    (urllib, requests) still gets the answer, not a reset."""

    def __init__(self, *args, header_timeout, max_connections, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout, self.max_connections = header_timeout, max_connections
        self.header_timer = None
        self.idle_since = time.monotonic()
        self.draining, self.drained, self.drain_timer = False, 0, None

    def is_idle(self):
        return self.cycle is None or self.cycle.response_complete

    def connection_made(self, transport):
        super().connection_made(transport)
        self.transport = DrainingTransport(transport, self)
        if len(self.connections) > self.max_connections and not self._close_oldest_idle():
            transport.write(BUSY_CONNECTION_ANSWER)
            transport.close()
            return
        self._await_headers()

    def drain_instead_of_close(self):
        """On a close after a 413 while the client still sends the body: read and drop it until
        the client closes, DRAIN_BYTES are read or header_timeout passes; True if draining."""
        if self.draining:
            return True
        cycle = self.cycle
        if (self.transport.transport.is_closing() or cycle is None or not cycle.response_complete or not cycle.scope.get(DRAIN_KEY)
                or self.conn.their_state is not h11.SEND_BODY):
            return False
        self.draining = True
        self.drain_timer = self.loop.call_later(self.header_timeout, self.transport.transport.close)
        self.flow.resume_reading()
        return True

    def data_received(self, data):
        if not self.draining:
            return super().data_received(data)
        self.drained += len(data)
        if self.drained > DRAIN_BYTES:
            self.transport.transport.close()

    def _close_oldest_idle(self):
        idle = [connection for connection in self.connections if connection is not self
                and isinstance(connection, GuardedProtocol) and connection.is_idle()]
        if not idle:
            return False
        min(idle, key=lambda connection: connection.idle_since).transport.transport.close()
        return True

    def _await_headers(self):
        if self.header_timer is not None:
            self.header_timer.cancel()
        self.idle_since = time.monotonic()
        self.header_timer = self.loop.call_later(self.header_timeout, self._close_if_idle)

    def _close_if_idle(self):
        self.header_timer = None
        if self.is_idle():
            self.transport.close()

    def on_response_complete(self):
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_headers()

    def connection_lost(self, exc):
        for timer in (self.header_timer, self.drain_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)
