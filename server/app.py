"""FastAPI app: Qdrant-shaped routes, response envelopes, api-key auth, body limits and metrics."""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import schemas
from server.config import Settings
from server.errors import ApiError
from server.metrics import CONTENT_TYPE, Metrics
from server.store import Store
from server.validation import (
    parse_collection, parse_ids_request, parse_json, parse_scroll, parse_search, parse_upsert,
)

__all__ = ["create_app"]

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def _render(content: Any) -> bytes:
    return json.dumps(content, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()


class Envelope(JSONResponse):
    """Compact JSON; NaN/Inf never leave the server."""

    def render(self, content: Any) -> bytes:
        return _render(content)


def _elapsed(scope: Scope) -> float:
    t0 = scope.get("state", {}).get("t0")
    return round(time.perf_counter() - t0, 6) if t0 is not None else 0.0


def ok(request: Request, result: Any) -> Envelope:
    return Envelope({"result": result, "status": "ok", "time": _elapsed(request.scope)})


async def respond(request: Request, result: Any, limit: int) -> Response:
    """The success envelope, serialised in a worker thread (a large answer never blocks the event loop);
    413 if it comes to more than ``limit`` bytes."""
    body = await run_in_threadpool(_render, {"result": result, "status": "ok", "time": _elapsed(request.scope)})
    if len(body) > limit:
        raise ApiError(413, f"the answer is {len(body)} bytes; expected at most {limit} (--max-response-bytes): "
                            "ask for fewer points, or without vectors or payloads")
    return Response(body, media_type="application/json")


def error(scope: Scope, status_code: int, message: str, headers: dict[str, str] | None = None) -> Envelope:
    return Envelope({"status": {"error": message}, "time": _elapsed(scope)}, status_code=status_code, headers=headers)


class Gate:
    """ASGI middleware: start time, metrics, api-key check, Content-Length limit."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics) -> None:
        self.app = app
        self.key = settings.api_key.encode() if settings.api_key else None
        self.max_body = settings.max_body_bytes
        self.metrics = metrics

    def _authorised(self, scope: Scope) -> tuple[bool, str]:
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"api-key")
        if given is None:
            auth = headers.get(b"authorization", b"")
            if auth[:7].lower() == b"bearer ":
                given = auth[7:].strip()
        if given is None:
            return False, "missing api key: no 'api-key' header; expected header 'api-key: <key>'"
        if not hmac.compare_digest(given, self.key or b""):
            return False, "wrong api key in the 'api-key' header; expected the key the server was started with"
        return True, ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        scope.setdefault("state", {})["t0"] = t0
        status = [500]
        started = [False]

        async def send_wrapper(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
                started[0] = True
            await send(msg)

        try:
            path = scope.get("path", "")
            if self.key is not None and path not in OPEN_PATHS:
                good, why = self._authorised(scope)
                if not good:
                    await error(scope, 401, why, {"WWW-Authenticate": "api-key"})(scope, receive, send_wrapper)
                    return
            cl = dict(scope.get("headers") or []).get(b"content-length")
            if cl is not None:
                try:
                    n = int(cl)
                except ValueError:
                    await error(scope, 400, f"Content-Length is {cl.decode(errors='replace')!r}; expected an integer")(
                        scope, receive, send_wrapper)
                    return
                if n > self.max_body:
                    await error(scope, 413, f"request body is {n} bytes; expected at most {self.max_body} "
                                            "(--max-body-bytes)")(scope, receive, send_wrapper)
                    return
            try:
                await self.app(scope, receive, send_wrapper)
            except Exception as exc:
                # Answer here instead of letting the exception reach the server, which would drop the
                # connection (the client's next request on it would fail with a reset).
                log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
                if started[0]:
                    raise
                await error(scope, 500, f"internal error: {type(exc).__name__}: {exc}")(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            self.metrics.observe(scope.get("method", "?"), getattr(route, "path", "unmatched"), status[0],
                                 time.perf_counter() - t0)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, 413 as soon as it exceeds ``limit`` bytes (chunked bodies included)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds {limit} bytes; expected at most {limit} (--max-body-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(settings: Settings, *, recover_in_background: bool = True) -> FastAPI:
    """Build the app over ``settings.data_dir``. The store is locked at startup; collections are
    recovered in a background thread (``/readyz`` answers 503 until done) unless told otherwise."""
    store = Store(settings)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store.acquire()
        thread = threading.Thread(target=store.recover, name="tqindex-recovery", daemon=True)
        if recover_in_background:
            thread.start()
        else:
            store.recover()
        try:
            yield
        finally:
            if thread.is_alive():
                thread.join()
            store.close()

    app = FastAPI(title="tqindex", version=_version(), lifespan=lifespan,
                  description="TurboQuant-compressed vector search with a Qdrant-shaped REST API.")
    app.state.store = store
    app.state.metrics = metrics
    app.state.settings = settings
    app.add_middleware(Gate, settings=settings, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return error(request.scope, exc.status_code, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        msg = {404: f"no route {request.method} {request.url.path}; expected one of the documented routes (see /docs)",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error(request.scope, exc.status_code, msg, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        parts = [f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors()]
        return error(request.scope, 400, "; ".join(parts))

    async def json_body(request: Request) -> Any:
        raw = await read_body(request, settings.max_body_bytes)
        return await run_in_threadpool(parse_json, raw)

    async def work(fn: Callable[..., Any], *args: Any) -> Any:
        return await run_in_threadpool(fn, *args)

    async def answer(request: Request, result: Any) -> Response:
        return await respond(request, result, settings.max_response_bytes)

    # -- health and metrics ------------------------------------------------------------------------
    @app.get("/healthz", tags=["service"], summary="Liveness (no auth)")
    async def healthz(request: Request) -> Response:
        return ok(request, "alive")

    @app.get("/readyz", tags=["service"], summary="Readiness: collections recovered (no auth)")
    async def readyz(request: Request) -> Response:
        if not store.ready:
            return error(request.scope, 503, "recovering collections from snapshots and logs; expected ready soon")
        # One damaged collection never makes the whole server unready: it is listed here, answers 503
        # (load failure) or refuses writes (quarantined), and can be deleted.
        return ok(request, {"ready": True, "collections": len(store.names()),
                            "recovery_s": round(store.recovery_s or 0.0, 4),
                            "failed": dict(store.errors), "quarantined": store.quarantined()})

    @app.get("/metrics", tags=["service"], summary="Prometheus metrics")
    async def prom(request: Request) -> Response:
        text = await work(lambda: metrics.render(store.stats()))
        return Response(text, media_type=CONTENT_TYPE)

    # -- collections ---------------------------------------------------------------------------------
    @app.post("/collections", tags=["collections"], summary="Create a collection",
              openapi_extra=schemas.body(schemas.COLLECTION))
    async def create_collection(request: Request) -> Response:
        spec = parse_collection(await json_body(request), settings)
        coll = await work(store.create, spec)
        return await answer(request, await work(coll.info))

    @app.get("/collections", tags=["collections"], summary="List collections")
    async def list_collections(request: Request) -> Response:
        store.check_ready()
        return await answer(request, {"collections": [{"name": n} for n in store.names()]})

    @app.get("/collections/{name}", tags=["collections"], summary="Config, points, memory of a collection")
    async def get_collection(request: Request, name: str) -> Response:
        return await answer(request, await work(store.get(name).info))

    @app.delete("/collections/{name}", tags=["collections"], summary="Delete a collection and its data")
    async def delete_collection(request: Request, name: str) -> Response:
        await work(store.delete, name)
        return await answer(request, True)

    @app.post("/collections/{name}/snapshot", tags=["collections"],
              summary="Write a snapshot now (atomic), then truncate the log")
    async def snapshot(request: Request, name: str) -> Response:
        info = await work(store.get(name).snapshot)
        return await answer(request, await work(info.to_json))

    # -- points --------------------------------------------------------------------------------------
    @app.put("/collections/{name}/points", tags=["points"], summary="Upsert points (an existing id is replaced)",
             openapi_extra=schemas.body(schemas.UPSERT))
    async def upsert(request: Request, name: str) -> Response:
        coll = store.get(name)
        body = await json_body(request)
        req = await work(parse_upsert, body, coll.spec.dim, settings, coll.spec.metric)
        return await answer(request, await work(coll.upsert, req))

    @app.post("/collections/{name}/points/get", tags=["points"], summary="Get points by id",
              openapi_extra=schemas.body(schemas.GET))
    async def get_points(request: Request, name: str) -> Response:
        coll = store.get(name)
        req = parse_ids_request(await json_body(request), settings, get=True)
        return await answer(request, await work(coll.get, req.ids, req.with_payload, req.with_vector))

    @app.post("/collections/{name}/points/delete", tags=["points"], summary="Delete points by id",
              openapi_extra=schemas.body(schemas.DELETE))
    async def delete_points(request: Request, name: str) -> Response:
        coll = store.get(name)
        req = parse_ids_request(await json_body(request), settings, get=False)
        return await answer(request, await work(coll.delete, req.ids))

    @app.post("/collections/{name}/points/scroll", tags=["points"], summary="Page through points by ascending id",
              openapi_extra=schemas.body(schemas.SCROLL))
    async def scroll(request: Request, name: str) -> Response:
        coll = store.get(name)
        req = parse_scroll(await json_body(request), settings)
        return await answer(request, await work(coll.scroll, req.offset, req.limit, req.with_payload, req.with_vector, req.filter))

    @app.post("/collections/{name}/search", tags=["points"], summary="k nearest neighbours (optionally filtered)",
              openapi_extra=schemas.body(schemas.SEARCH))
    async def search(request: Request, name: str) -> Response:
        coll = store.get(name)
        body = await json_body(request)
        req = await work(parse_search, body, coll.spec.dim, settings, coll.spec.metric)
        hits = await work(coll.search, req)
        return await answer(request, hits if req.batch else hits[0])

    return app


def _version() -> str:
    try:
        import tqindex

        return str(tqindex.__version__)
    except Exception:  # pragma: no cover
        return "unknown"
