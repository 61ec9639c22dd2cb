"""A Ray Serve deployment of a trained model: the same model URI as ``mlflow models serve``, with concurrent
requests batched into one forward pass and one index search.

    serve run eimf.serving.ray_serve:app model_uri=models:/eimf-ml-1m/1
    curl -s -X POST http://127.0.0.1:8000/ -H 'Content-Type: application/json' \\
         -d '{"history": ["1193", "661", "914"], "k": 5}'

A request is one user (:mod:`eimf.serving.recommender`); it is validated on its own before it joins a batch, so a
bad request gets a 400 naming its field and never fails the others. Bodies over ``max_body_bytes`` get a 413
without being read. ``model_uri`` is anything :func:`eimf.serving.pyfunc.load_recommender` reads (a model folder,
``models:/...``, ``runs:/...``); a ``models:/`` URI needs ``MLFLOW_TRACKING_URI`` in the replica's environment.
"""
from __future__ import annotations

import json
import logging
from typing import List

import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from eimf.evaluation.retrieval import set_faiss_threads
from eimf.serving.pyfunc import load_recommender
from eimf.serving.recommender import RequestError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 1})
class Recommend:
    def __init__(self, model_uri: str, max_batch_size: int = 64, batch_wait_timeout_s: float = 0.002,
                 max_body_bytes: int = MAX_BODY_BYTES, threads: int = 1):
        torch.set_num_threads(threads)  # a single-user forward is tiny: more threads only add contention
        set_faiss_threads(threads)
        self.recommender = load_recommender(model_uri)
        self.model_uri = model_uri
        self.max_body_bytes = max_body_bytes
        self._batch.set_max_batch_size(max_batch_size)
        self._batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        log.info("serving %s (%d items)", model_uri, self.recommender.n_items)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def _batch(self, queries: List) -> List[dict]:
        return self.recommender.answer(queries)

    async def __call__(self, request: Request):
        if request.method == "GET":
            return JSONResponse({"model_uri": self.model_uri, "items": self.recommender.n_items})
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body_bytes:
            return _error(413, f"request body of {size} bytes; at most {self.max_body_bytes}")
        body = b""
        async for chunk in request.stream():  # bounded even without a content-length header
            body += chunk
            if len(body) > self.max_body_bytes:
                return _error(413, f"request body over {self.max_body_bytes} bytes")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return _error(400, f"the body is not JSON: {e}")
        try:
            query = self.recommender.parse(payload)
        except RequestError as e:
            return _error(400, str(e))
        return JSONResponse(await self._batch(query))


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def app(args: dict):
    """The application ``serve run eimf.serving.ray_serve:app model_uri=...`` builds. Optional arguments:
    ``max_batch_size``, ``batch_wait_timeout_s``, ``max_body_bytes``, ``num_replicas``, ``num_cpus`` (per replica),
    ``threads``, and ``tracking_uri`` (set as ``MLFLOW_TRACKING_URI`` in the replicas, for ``models:/`` URIs;
    default: the replicas' own environment)."""
    if "model_uri" not in args:
        raise ValueError("serve run eimf.serving.ray_serve:app needs model_uri=<model folder or models:/name/version>")
    actor = {"num_cpus": float(args.get("num_cpus", 1))}
    if args.get("tracking_uri"):
        actor["runtime_env"] = {"env_vars": {"MLFLOW_TRACKING_URI": str(args["tracking_uri"])}}
    deployment = Recommend.options(num_replicas=int(args.get("num_replicas", 1)), ray_actor_options=actor)
    return deployment.bind(str(args["model_uri"]), int(args.get("max_batch_size", 64)),
                           float(args.get("batch_wait_timeout_s", 0.002)), int(args.get("max_body_bytes", MAX_BODY_BYTES)),
                           int(args.get("threads", 1)))
