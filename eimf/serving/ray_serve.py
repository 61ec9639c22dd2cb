"""The Ray Serve application of a trained model: the same model URI as ``mlflow models serve``, a typed HTTP API
(FastAPI, so the contract of :mod:`eimf.serving.schema` is published at ``/openapi.json``), and concurrent requests
batched into one forward pass and one index search.

    eimf serve models:/eimf-ml-1m/1           # starts Ray; :8000 is the replica's own server; Ctrl-C stops it all
    serve run eimf.serving.ray_serve:app model_uri=models:/eimf-ml-1m/1        # on a running Ray cluster
    curl -s -X POST http://127.0.0.1:8000/recommend -H 'Content-Type: application/json' \\
         -d '{"history": ["1193", "661", "914"], "k": 5}'

Routes: ``POST /recommend`` (one user), ``GET /health``, ``GET /openapi.json``, ``GET /docs``. Every error answer is
:class:`~eimf.serving.schema.ErrorResponse` ``{"error": {"field", "reason"}}``: 400 for a body that is not JSON,
413 for a body over 1 MiB (refused before it is read), 415 for a body not sent as JSON, 422 for JSON that breaks the
contract or names no known item, 404/405 for a wrong route or method. Past ``max_in_flight`` requests in a replica
(and past Ray's ``max_ongoing_requests`` + ``max_queued_requests``), 503 at once instead of a queue without bound.
A request is validated on its own before it joins a batch, so a bad request never fails the others.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from typing import List

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException

import eimf
from eimf.evaluation.retrieval import set_faiss_threads
from eimf.ray_init import init_ray
from eimf.serving.pyfunc import load_recommender
from eimf.serving.schema import (ErrorResponse, RecommendRequest, RecommendResponse, RequestError,
                                 from_error_dicts)

log = logging.getLogger(__name__)

#: Larger bodies get 413 unread: a 10,000-id history is about 100 KB.
MAX_BODY_BYTES = 1 << 20
#: Requests one replica holds (waiting for a batch or in one); past it, the app answers 503 at once (InFlightLimit).
#: 64 kept the accepted p99 at 256 clients within 15 % of its value at 64 (150 against 130 ms); 128 doubled it
#: (docs/serving.md, Load).
MAX_IN_FLIGHT = 64
#: Ray Serve's own limits, above the app's so that its queue stays empty: past both, Ray answers 503 too.
MAX_ONGOING = 256
MAX_QUEUED = 64
ROUTE = "/recommend"
#: A lone request does not wait for company: under load, batches fill with what queued while the last one ran
#: (measured: a 2 ms wait cost single users 2.5 ms at p50 and 12 ms at p99, and bought no throughput).
BATCH_WAIT_S = 0.0
#: Ray Serve's own low-latency switches (direct ingress: no proxy hop; user code on the replica's event loop;
#: buffered access logs), read by Ray's processes from their environment: set for a Ray that `eimf serve` starts.
#: Direct ingress drains a stopping replica for at least 30 s by default, so that a load balancer sees it go: a
#: Ray that `eimf serve` owns has no balancer in front, and Ctrl-C should end it in seconds.
LOW_LATENCY_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
APP_NAME = "eimf"

api = FastAPI(title="eimf recommender", version=getattr(eimf, "__version__", "0"),
              description="Multi-interest recommendations from a trained eimf model (raw item ids in and out).")


def _error(status: int, reason: str, field=None) -> JSONResponse:
    return JSONResponse({"error": {"field": field, "reason": reason}}, status_code=status)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        return _error(400, f"the body is not JSON: {errors[0].get('ctx', {}).get('error', errors[0]['msg'])}")
    if errors and isinstance(errors[0].get("input"), bytes):  # FastAPI passes a non-JSON content type's body as is
        return _error(415, f"send the request as JSON (Content-Type: application/json), not "
                           f"{request.headers.get('content-type', 'no content type')!r:.60}")
    e = from_error_dicts(errors)
    return _error(422, e.reason, e.field)


@api.exception_handler(HTTPException)
async def _http(request: Request, exc: HTTPException) -> JSONResponse:
    # FastAPI's own 400 ("error parsing the body": invalid UTF-8, nesting too deep), 404, 405: the same shape
    cause = exc.__cause__
    reason = f"the body is not JSON ({type(cause).__name__}: {cause!s:.100})" if exc.status_code == 400 and cause \
        else str(exc.detail)
    return _error(exc.status_code, reason)


class BodyLimit:
    """Refuses a body over ``limit`` bytes with 413: at once from its Content-Length, else as soon as the streamed
    (chunked) body passes it, so that nothing larger is ever held. Plain ASGI: no per-request task or copy."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        size = dict(scope["headers"]).get(b"content-length")
        if size is not None and (not size.isdigit() or int(size) > self.limit):
            reason = f"request body of {size.decode('latin-1')[:20]} bytes; at most {self.limit}"
            return await _error(413, reason)(scope, receive, send)
        seen = 0

        async def bounded():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # FastAPI re-raises an HTTPException from the body read; other errors become 400
                raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, bounded, send)


class InFlightLimit:
    """Admission control: past ``limit`` requests in the replica (waiting for a batch or in one), a request is
    refused with 503 at once, before its body is read. Ray Serve's own queue (``max_queued_requests``) refused
    as promptly but let the requests it kept wait up to 23 s at 4x overload (docs/serving.md, Load)."""

    limit = MAX_IN_FLIGHT  # set per replica by Recommend.__init__
    in_flight = 0

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        cls = type(self)
        if scope["type"] != "http" or scope.get("path") != ROUTE:
            return await self.app(scope, receive, send)
        if cls.in_flight >= cls.limit:
            return await _error(503, f"overloaded: {cls.limit} requests in work; retry later")(scope, receive, send)
        cls.in_flight += 1  # one event loop per replica: no lock needed
        try:
            await self.app(scope, receive, send)
        finally:
            cls.in_flight -= 1


api.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
api.add_middleware(InFlightLimit)  # added last, so it runs first

_ERRORS = {400: {"model": ErrorResponse, "description": "the body is not JSON"},
           413: {"model": ErrorResponse, "description": f"the body is over {MAX_BODY_BYTES} bytes"},
           415: {"model": ErrorResponse, "description": "the body is not sent as JSON"},
           422: {"model": ErrorResponse, "description": "the request breaks the contract or names no known item"},
           503: {"description": "overloaded: retry later"}}


# A stopping replica finishes its requests for up to 5 s (Ray's default, 20 s, held Ctrl-C for 18 s in all).
@serve.deployment(max_ongoing_requests=MAX_ONGOING, max_queued_requests=MAX_QUEUED,
                  graceful_shutdown_wait_loop_s=0.5, graceful_shutdown_timeout_s=5, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class Recommend:
    def __init__(self, model_uri: str, max_batch_size: int = 64, batch_wait_timeout_s: float = BATCH_WAIT_S,
                 threads: int = 1, max_in_flight: int = MAX_IN_FLIGHT):
        InFlightLimit.limit = max_in_flight
        torch.set_num_threads(threads)  # a single-user forward is tiny: more threads only add contention
        set_faiss_threads(threads)
        self.recommender = load_recommender(model_uri)
        self.model_uri = model_uri
        self._batch.set_max_batch_size(max_batch_size)
        self._batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        log.info("serving %s (%d items)", model_uri, self.recommender.n_items)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _batch(self, queries: List) -> List[dict]:
        return self.recommender.answer(queries)

    @api.get("/health")
    async def health(self) -> dict:
        return {"model_uri": self.model_uri, "items": self.recommender.n_items}

    # The answer is returned as a JSONResponse: FastAPI would otherwise validate it against RecommendResponse
    # again, on the hot path, for a dict the Recommender builds field by field.
    @api.post(ROUTE, response_model=RecommendResponse, responses=_ERRORS)
    async def recommend(self, request: RecommendRequest):
        try:
            query = self.recommender.parse(request)
        except RequestError as e:
            return _error(422, e.reason, e.field)
        return JSONResponse(await self._batch(query))


def app(args: dict):
    """The application ``serve run eimf.serving.ray_serve:app model_uri=...`` builds. Optional arguments:
    ``max_batch_size``, ``batch_wait_timeout_s``, ``num_replicas``, ``num_cpus`` (per replica), ``threads``,
    ``max_in_flight`` (the app's own limit), ``max_ongoing_requests``, ``max_queued_requests`` (Ray's), and ``tracking_uri`` (set as ``MLFLOW_TRACKING_URI`` in the
    replicas, for ``models:/`` URIs; default: the replicas' own environment)."""
    if "model_uri" not in args:
        raise ValueError("serve run eimf.serving.ray_serve:app needs model_uri=<model folder or models:/name/version>")
    actor = {"num_cpus": float(args.get("num_cpus", 1))}
    if args.get("tracking_uri"):
        actor["runtime_env"] = {"env_vars": {"MLFLOW_TRACKING_URI": str(args["tracking_uri"])}}
    deployment = Recommend.options(num_replicas=int(args.get("num_replicas", 1)), ray_actor_options=actor,
                                   max_ongoing_requests=int(args.get("max_ongoing_requests", MAX_ONGOING)),
                                   max_queued_requests=int(args.get("max_queued_requests", MAX_QUEUED)))
    return deployment.bind(str(args["model_uri"]), int(args.get("max_batch_size", 64)),
                           float(args.get("batch_wait_timeout_s", BATCH_WAIT_S)), int(args.get("threads", 1)),
                           int(args.get("max_in_flight", MAX_IN_FLIGHT)))


def openapi_document() -> dict:
    """The OpenAPI document the app serves, without starting it (for clients and ``eimf serve --openapi``)."""
    return json.loads(json.dumps(api.openapi()))


class PortInUseError(RuntimeError):
    """``eimf serve``'s port is taken by another process."""


def _port_is_free(host: str, port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def direct_ingress_on() -> bool:
    """Whether Ray Serve gives ingress replicas HTTP servers of their own, as its processes will read it from the
    environment (RAY_SERVE_THROUGHPUT_OPTIMIZED turns it on unless RAY_SERVE_ENABLE_DIRECT_INGRESS=0)."""
    explicit = os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS")
    if explicit is not None:
        return explicit == "1"
    return os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1"


def give_the_replica_the_port(host: str, port: int) -> int:
    """For a Ray about to start on this machine, with direct ingress and one replica: its replica's own HTTP server
    will listen on ``port``; returns a free port for Ray's proxy (``serve.start``'s ``http_options``)."""
    if not _port_is_free(host, port):
        raise PortInUseError(f"{host}:{port} is in use: choose another --port")
    # Ray's port range for the replicas' servers ([min, max)), read by its controller at start: exactly this port. A
    # released port is held back from new replicas for HAProxy's sake by default; without HAProxy a replica that Ray
    # restarts must take the same port again at once.
    os.environ.update(RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(port),
                      RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(port + 1), RAY_SERVE_PORT_QUARANTINE_S="0")
    return _free_port(host)


def serve_until_stopped(model_uri: str, host: str = "127.0.0.1", port: int = 8000, **app_args) -> None:
    """``eimf serve``: deploy the app on the Ray cluster in ``RAY_ADDRESS``, else on a Ray started here for it, and
    serve until SIGINT or SIGTERM. Then a Ray started here is shut down whole (the Serve controller, proxy and
    replicas with it, so no actor outlives the command); on a cluster only this application is deleted.

    On a Ray started here with one replica, ``port`` is the replica's own HTTP server (Ray Serve's direct
    ingress) and Ray's proxy listens on another port: on 2 cores the proxy hop cost 4x the throughput and set the
    tail past saturation (docs/serving.md, Load). With several replicas, or on a cluster, clients reach
    ``port`` through the proxy, which spreads them over the replicas."""
    own_ray = not os.environ.get("RAY_ADDRESS")
    proxy_port = int(port)
    if own_ray:
        for key, value in LOW_LATENCY_ENV.items():
            os.environ.setdefault(key, value)
        if int(app_args.get("num_replicas", 1)) == 1 and direct_ingress_on():
            proxy_port = give_the_replica_the_port(host, int(port))
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    init_ray(own=True)
    try:
        serve.start(http_options={"host": host, "port": proxy_port})
        serve.run(app({"model_uri": model_uri, **app_args}), name=APP_NAME, route_prefix="/", blocking=False)
        via = "" if proxy_port == int(port) else f"; Ray's proxy at http://{host}:{proxy_port}"
        print(f"eimf serve: {model_uri} at http://{host}:{port}{ROUTE} (contract: /openapi.json{via}); "
              "Ctrl-C stops it", flush=True)
        while not stop.wait(0.2):  # a short wait: signal handlers run between waits
            pass
        print("eimf serve: stopping", flush=True)
    finally:
        t0 = time.monotonic()
        serve.delete(APP_NAME)  # the replicas drain: requests in flight are answered
        if own_ray:  # then the Serve controller and proxy go with the Ray this command started
            ray.shutdown()
        log.info("eimf serve: stopped in %.1f s", time.monotonic() - t0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)

