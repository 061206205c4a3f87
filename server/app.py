"""FastAPI app: Qdrant's REST routes (the subset qdrant-client uses), envelopes, api-key auth, body limits, metrics."""

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
from server.requests import (
    PayloadRequest, parse_batch, parse_count, parse_delete_payload, parse_path_id, parse_query, parse_retrieve,
    parse_scroll, parse_search, parse_selector, parse_set_payload, parse_upsert,
)
from server.store import Store
from server.validation import check_name, parse_collection, parse_json

__all__ = ["create_app"]

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/livez"})
# The Qdrant release whose REST API (the subset qdrant-client uses) this server answers; GET / reports
# it as "version", which qdrant-client's compatibility check compares with its own.
QDRANT_API_VERSION = "1.20.0"


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
                  description="TurboQuant-compressed vector search speaking Qdrant's REST API (the subset qdrant-client uses).")
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

    # -- service ---------------------------------------------------------------------------------------
    @app.get("/", tags=["service"], summary="Name and the Qdrant API version served")
    async def root(request: Request) -> Response:
        return Envelope({"title": "tqindex: TurboQuant vector search speaking Qdrant's REST API",
                         "version": QDRANT_API_VERSION, "tqindex_version": _version()})

    @app.get("/healthz", tags=["service"], summary="Liveness (no auth)")
    async def healthz(request: Request) -> Response:
        return ok(request, "alive")

    @app.get("/livez", tags=["service"], summary="Liveness (no auth)")
    async def livez(request: Request) -> Response:
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
    @app.get("/collections", tags=["collections"], summary="List collections")
    async def list_collections(request: Request) -> Response:
        store.check_ready()
        return await answer(request, {"collections": [{"name": n} for n in store.names()]})

    @app.put("/collections/{name}", tags=["collections"], summary="Create a collection (Qdrant CreateCollection)",
             openapi_extra=schemas.body(schemas.CREATE))
    async def create_collection(request: Request, name: str) -> Response:
        spec = parse_collection(name, await json_body(request), settings)
        await work(store.create, spec)
        return await answer(request, True)

    @app.get("/collections/{name}", tags=["collections"], summary="Qdrant CollectionInfo, plus tqindex's numbers")
    async def get_collection(request: Request, name: str) -> Response:
        return await answer(request, await work(store.get(name).info))

    @app.get("/collections/{name}/exists", tags=["collections"], summary="Whether a collection exists")
    async def collection_exists(request: Request, name: str) -> Response:
        store.check_ready()
        check_name(name)
        return await answer(request, {"exists": name in store.names() or name in store.errors})  # failed: exists

    @app.delete("/collections/{name}", tags=["collections"], summary="Delete a collection and its data")
    async def delete_collection(request: Request, name: str) -> Response:
        await work(store.delete, name)
        return await answer(request, True)

    @app.put("/collections/{name}/index", tags=["collections"],
             summary="Payload index: accepted, nothing to build (filters need no index here)")
    async def create_field_index(request: Request, name: str) -> Response:
        coll = store.get(name)
        body = await json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("field_name"), str):
            raise ApiError(400, "payload index request needs 'field_name': a payload key")
        return await answer(request, {"operation_id": coll.lsn, "status": "completed"})

    @app.delete("/collections/{name}/index/{field}", tags=["collections"], summary="Payload index: accepted")
    async def delete_field_index(request: Request, name: str, field: str) -> Response:
        return await answer(request, {"operation_id": store.get(name).lsn, "status": "completed"})

    # -- snapshots -----------------------------------------------------------------------------------
    @app.post("/collections/{name}/snapshots", tags=["snapshots"],
              summary="Write a snapshot now (atomic), then truncate the log")
    async def create_snapshot(request: Request, name: str) -> Response:
        info = await work(store.get(name).snapshot)
        return await answer(request, await work(info.to_json))

    @app.get("/collections/{name}/snapshots", tags=["snapshots"], summary="The collection's (newest) snapshot")
    async def list_snapshots(request: Request, name: str) -> Response:
        snaps = await work(store.get(name).snapshots)
        return await answer(request, [await work(s.to_json) for s in snaps])

    @app.delete("/collections/{name}/snapshots/{snapshot}", tags=["snapshots"], summary="Refused (see message)")
    async def delete_snapshot(request: Request, name: str, snapshot: str) -> Response:
        store.get(name)
        raise ApiError(400, f"snapshot {snapshot!r} cannot be deleted: a tqindex snapshot is the collection's "
                            "durable state (its log is truncated after it; older ones are removed automatically)")

    # -- points: writes ------------------------------------------------------------------------------
    @app.put("/collections/{name}/points", tags=["points"], summary="Upsert points (an existing id is replaced)",
             openapi_extra=schemas.body(schemas.UPSERT))
    async def upsert(request: Request, name: str) -> Response:
        coll = store.get(name)
        body = await json_body(request)
        req = await work(parse_upsert, body, coll.spec.dim, settings, coll.spec.metric)
        return await answer(request, await work(coll.upsert, req))

    @app.post("/collections/{name}/points/delete", tags=["points"], summary="Delete points by id or by filter",
              openapi_extra=schemas.body(schemas.SELECTOR))
    async def delete_points(request: Request, name: str) -> Response:
        coll = store.get(name)
        sel = parse_selector(await json_body(request), settings, "delete request")
        return await answer(request, await work(coll.delete, sel))

    @app.post("/collections/{name}/points/payload", tags=["points"], summary="Set (merge) payload keys",
              openapi_extra=schemas.body(schemas.SET_PAYLOAD))
    async def set_payload(request: Request, name: str) -> Response:
        coll = store.get(name)
        req = parse_set_payload(await json_body(request), settings, overwrite=False)
        return await answer(request, await work(coll.update_payload, req))

    @app.put("/collections/{name}/points/payload", tags=["points"], summary="Overwrite payloads",
             openapi_extra=schemas.body(schemas.SET_PAYLOAD))
    async def overwrite_payload(request: Request, name: str) -> Response:
        coll = store.get(name)
        req = parse_set_payload(await json_body(request), settings, overwrite=True)
        return await answer(request, await work(coll.update_payload, req))

    @app.post("/collections/{name}/points/payload/delete", tags=["points"], summary="Delete payload keys",
              openapi_extra=schemas.body(schemas.DELETE_PAYLOAD))
    async def delete_payload(request: Request, name: str) -> Response:
        coll = store.get(name)
        req = parse_delete_payload(await json_body(request), settings)
        return await answer(request, await work(coll.update_payload, req))

    @app.post("/collections/{name}/points/payload/clear", tags=["points"], summary="Clear payloads",
              openapi_extra=schemas.body(schemas.SELECTOR))
    async def clear_payload(request: Request, name: str) -> Response:
        coll = store.get(name)
        sel = parse_selector(await json_body(request), settings, "clear payload request")
        return await answer(request, await work(coll.update_payload, PayloadRequest(sel, "clear")))

    # -- points: reads -------------------------------------------------------------------------------
    @app.post("/collections/{name}/points", tags=["points"], summary="Retrieve points by id",
              openapi_extra=schemas.body(schemas.RETRIEVE))
    async def retrieve(request: Request, name: str) -> Response:
        coll = store.get(name)
        ids, wp, wv = parse_retrieve(await json_body(request), settings)
        return await answer(request, await work(coll.get, ids, wp, wv))

    @app.get("/collections/{name}/points/{pid}", tags=["points"], summary="Retrieve one point")
    async def get_point(request: Request, name: str, pid: str) -> Response:
        coll = store.get(name)
        found = await work(coll.get, [parse_path_id(pid)], True, True)
        if not found:
            raise ApiError(404, f"point {pid} does not exist in collection {name!r}")
        return await answer(request, found[0])

    async def _searches(coll: Any, bodies: list[Any], parse: Callable[..., Any]) -> list[list[dict[str, Any]]]:
        def run() -> list[list[dict[str, Any]]]:
            reqs = [parse(b, coll.spec.dim, settings, coll.spec.metric) for b in bodies]  # all valid, then search
            total = sum(r.limit + r.offset for r in reqs)
            if total > settings.max_results:
                raise ApiError(413, f"the request asks for {len(reqs)} queries with {total} results in all (limit + "
                                    f"offset); expected at most {settings.max_results} per request (--max-results)")
            return [coll.search(r) for r in reqs]

        return await work(run)

    @app.post("/collections/{name}/points/query", tags=["search"], summary="Nearest neighbours (query_points)",
              openapi_extra=schemas.body(schemas.QUERY))
    async def query(request: Request, name: str) -> Response:
        coll = store.get(name)
        hits = await _searches(coll, [await json_body(request)], parse_query)
        return await answer(request, {"points": hits[0]})

    @app.post("/collections/{name}/points/query/batch", tags=["search"], summary="Several queries",
              openapi_extra=schemas.body(schemas.BATCH))
    async def query_batch(request: Request, name: str) -> Response:
        coll = store.get(name)
        hits = await _searches(coll, parse_batch(await json_body(request), settings), parse_query)
        return await answer(request, [{"points": h} for h in hits])

    @app.post("/collections/{name}/points/search", tags=["search"], summary="Nearest neighbours (search API)",
              openapi_extra=schemas.body(schemas.SEARCH))
    async def search(request: Request, name: str) -> Response:
        coll = store.get(name)
        hits = await _searches(coll, [await json_body(request)], parse_search)
        return await answer(request, hits[0])

    @app.post("/collections/{name}/points/search/batch", tags=["search"], summary="Several searches",
              openapi_extra=schemas.body(schemas.BATCH))
    async def search_batch(request: Request, name: str) -> Response:
        coll = store.get(name)
        return await answer(request, await _searches(coll, parse_batch(await json_body(request), settings),
                                                     parse_search))

    @app.post("/collections/{name}/points/scroll", tags=["points"], summary="Page through points in id order",
              openapi_extra=schemas.body(schemas.SCROLL))
    async def scroll(request: Request, name: str) -> Response:
        coll = store.get(name)
        req = parse_scroll(await json_body(request), settings)
        return await answer(request, await work(coll.scroll, req.offset, req.limit, req.with_payload, req.with_vector,
                                                req.filter))

    @app.post("/collections/{name}/points/count", tags=["points"], summary="Count points (optionally filtered)",
              openapi_extra=schemas.body(schemas.COUNT))
    async def count(request: Request, name: str) -> Response:
        coll = store.get(name)
        flt = parse_count(await json_body(request), settings)
        return await answer(request, {"count": await work(coll.count, flt)})

    return app


def _version() -> str:
    try:
        import tqindex

        return str(tqindex.__version__)
    except Exception:  # pragma: no cover
        return "unknown"
