"""The ML backend over HTTP: FastAPI on uvicorn, with limits, timeouts and an access log.

:mod:`autolabel.mlbackend` decides what is served; this module serves it (see that module's
docstring for the endpoints and the safety rules).  FastAPI was chosen over Label Studio's
own ``label-studio-ml`` package: its last release on PyPI (1.0.9) is from 2023 and its
current code is a template repository to copy rather than a library, while FastAPI and
uvicorn are maintained, install here without touching other packages, and give the
request-level control needed — streaming body limits, a per-connection read timeout (a
small subclass of uvicorn's h11 protocol), a concurrency limit, graceful shutdown — plus
an OpenAPI schema.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from autolabel.mlbackend import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    BackendConfig,
    EasyTierBackend,
    RequestError,
)
from connectors.errors import InputError, UsageError
from connectors.labelstudio.provenance import package_version

log = logging.getLogger(__name__)
access_log = logging.getLogger("labeltriage.access")


# -- request bodies ---------------------------------------------------------------------------


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of parsed JSON, counted without recursion; stops once past ``limit``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_body(data: bytes, max_depth: int) -> dict[str, Any]:
    """A request body as a JSON object; :class:`RequestError` 400 saying what is wrong."""
    try:
        body = json.loads(data or b"{}")
    except RecursionError:
        raise RequestError(HTTPStatus.BAD_REQUEST, "body is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
    if json_depth(body, max_depth) > max_depth:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body is nested deeper than {max_depth} levels")
    return body


# -- HTTP -------------------------------------------------------------------------------------


def _authorized(config: BackendConfig, header: str) -> bool:
    """Whether an ``Authorization`` header carries the configured basic auth or token."""
    if config.basic_auth is None and not config.token:
        return True
    scheme, _, value = header.partition(" ")
    if scheme == "Basic" and config.basic_auth is not None:
        try:
            user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        ok_user = hmac.compare_digest(user.encode(), config.basic_auth[0].encode())
        ok_pass = hmac.compare_digest(password.encode(), config.basic_auth[1].encode())
        return ok_user and ok_pass
    if scheme in ("Bearer", "Token") and config.token:
        return hmac.compare_digest(value.strip().encode(), config.token.encode())
    return False


def create_app(backend: EasyTierBackend) -> Any:
    """The ASGI application (FastAPI) serving ``backend``."""
    config = backend.config
    limiter = anyio.CapacityLimiter(config.workers)
    app = FastAPI(
        title="labeltriage ML backend",
        version=package_version(),
        description="Pre-annotations of the calibrated easy tier for Label Studio.",
        docs_url=None,
        redoc_url=None,
    )

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def run(fn: Callable[..., dict[str, Any]], *args: Any) -> JSONResponse:
        try:
            return JSONResponse(await anyio.to_thread.run_sync(fn, *args, limiter=limiter))
        except RequestError as exc:
            return error(exc.status, exc.message)
        except (UsageError, InputError) as exc:
            log.error("%s", exc)
            return error(HTTPStatus.SERVICE_UNAVAILABLE, str(exc))
        except Exception as exc:
            log.exception("request failed")
            return error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}")

    async def read_body(request: Request) -> bytes:
        limit = config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise RequestError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {declared!r}")
            if int(declared) > limit:
                raise RequestError(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"body of {declared} bytes is over the limit of {limit}",
                )
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body is over the limit of {limit} bytes"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    async def post(request: Request, handler: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
        try:
            data = await read_body(request)
        except ClientDisconnect:  # gone (or closed for stalling) before its body arrived
            return error(HTTPStatus.BAD_REQUEST, "the client left before sending its body")
        except RequestError as exc:
            # the unread rest of the body must not be taken for the next request
            return error(exc.status, exc.message, {"Connection": "close"})
        return await run(lambda: handler(parse_body(data, config.max_json_depth)))

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Any:
        if not _authorized(config, request.headers.get("authorization", "")):
            return error(
                HTTPStatus.UNAUTHORIZED,
                "authentication required",
                {"WWW-Authenticate": 'Basic realm="labeltriage"', "Connection": "close"},
            )
        return await call_next(request)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.get("/health", summary="Health and what is served")
    @app.get("/", include_in_schema=False)
    async def health() -> Any:
        return await run(backend.health)

    @app.get("/versions", summary="The model version served")
    async def versions() -> Any:
        return await run(lambda: {"versions": [backend.tier().version]})

    @app.post("/setup", summary="Label Studio connects: the label config; the model version")
    async def setup(request: Request) -> Any:
        return await post(request, backend.setup)

    @app.post("/predict", summary="Pre-annotations of the easy tier, one entry per task")
    async def predict(request: Request) -> Any:
        return await post(request, backend.predict)

    @app.post("/webhook", summary="Label Studio's annotation events, recorded for the next run")
    async def webhook(request: Request) -> Any:
        return await post(request, backend.webhook)

    return _AccessLog(app)


class _AccessLog:
    """ASGI middleware: one JSON line per request on the ``labeltriage.access`` logger."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500, "bytes": 0}

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            elif message["type"] == "http.response.body":
                status["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            client = scope.get("client") or ("-", 0)
            access_log.info(
                json.dumps(
                    {
                        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                        "client": f"{client[0]}:{client[1]}",
                        "method": scope.get("method"),
                        "path": scope.get("path"),
                        "status": status["code"],
                        "bytes": status["bytes"],
                        "ms": round(1000 * (time.perf_counter() - start), 2),
                    }
                )
            )


def _protocol(read_timeout_s: float) -> type:
    """uvicorn's h11 protocol, closing a connection that stalls before its request is complete.

    The timer runs from the connection's start, and again from the end of each response,
    until the client has sent one whole request (headers and body); uvicorn's keep-alive
    timeout only starts after a response, so a client sending nothing, or half a request,
    would otherwise hold its connection for ever.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _read_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._read_timer = self.loop.call_later(read_timeout_s, self._timed_out)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _timed_out(self) -> None:
            self._read_timer = None
            if self.transport.is_closing():
                return
            if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
                return  # the request is in: the response will re-arm the timer
            self.logger.info("closing a connection that sent no complete request in time")
            self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return TimedH11Protocol


def _uvicorn_server() -> type:
    import uvicorn

    class Uvicorn(uvicorn.Server):
        """uvicorn's server, except that after a graceful stop on SIGTERM or Ctrl-C it returns
        (the command exits 0) instead of raising the signal again once it has stopped."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Uvicorn


class BackendServer:
    """The backend on a bound socket: :meth:`serve` in the foreground, or :meth:`start` in a thread."""

    def __init__(
        self, backend: EasyTierBackend, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
    ) -> None:
        import uvicorn

        server_class = _uvicorn_server()
        self.backend = backend
        config = backend.config
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError:
            self.socket.close()
            raise
        self.socket.listen(128)
        bound, bound_port = self.socket.getsockname()[:2]
        self.address: tuple[str, int] = (str(bound), int(bound_port))
        self.url = (
            f"http://[{bound}]:{bound_port}"
            if ":" in str(bound)
            else f"http://{bound}:{bound_port}"
        )
        self.uvicorn = server_class(
            uvicorn.Config(
                create_app(backend),
                http=_protocol(config.read_timeout_s),
                lifespan="off",
                access_log=False,
                log_config=None,
                timeout_keep_alive=max(1, round(config.keepalive_s)),
                timeout_graceful_shutdown=max(1, round(config.shutdown_timeout_s)),
                limit_concurrency=config.limit_concurrency,
                server_header=False,
            )
        )
        self._thread: threading.Thread | None = None

    def serve(self) -> None:
        """Serve until SIGTERM or Ctrl-C; requests in flight finish first (graceful shutdown)."""
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self.socket.close()

    def start(self, timeout_s: float = 30.0) -> BackendServer:
        """Serve in a background thread; returns once the server accepts connections."""
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self.uvicorn.serve(sockets=[self.socket])),
            name="labeltriage-mlbackend",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the ML backend did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop a server started with :meth:`start` (graceful, like SIGTERM)."""
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self.socket.close()

    def __enter__(self) -> BackendServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_server(
    config: BackendConfig, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> BackendServer:
    """A ready server (bound, not yet serving); ``port=0`` picks a free port."""
    config.check(host)
    return BackendServer(EasyTierBackend(config), host, port)


__all__ = [
    "BackendServer",
    "create_app",
    "json_depth",
    "make_server",
    "parse_body",
]
