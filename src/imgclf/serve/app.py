"""`imgclf serve`: the registered model behind an HTTP service (FastAPI on uvicorn).

- `POST /predict`: an image file as the body (any type PIL reads, any size: decoded exactly as `imgclf predict`
  decodes it), or a multipart/form-data batch of files; answers the class, its calibrated probability, the
  top-k, the low-confidence flag and the model that answered.
- `POST /invocations`: float tensors in [0, 1] as `mlflow models serve` takes them (`{"inputs": ...}` or
  `{"instances": ...}`, shape (N, C, H, W), or (N, H, W) for one channel); answers `{"predictions": ...}`.
- `GET /livez` (the process answers), `/readyz` (a model is loaded and warmed), `/metrics` (Prometheus).

Every answer carries the model's name, version and weights digest as `X-Model-*` headers. Requests are scored
in dynamic batches (batching.py); the model follows its alias (following.py); with a shadow, every batch is
scored on it too, off the response path, and the comparison recorded in MLflow (shadow.py). A bad request gets a 4xx with a
one-line JSON `{"error": ...}` and nobody else notices. Only the project's own loader reads a model.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, Request  # at module level: FastAPI reads the handlers' annotations from here
from fastapi.responses import JSONResponse, Response

from ..config import Config
from ..console import one_line
from .batching import Batcher, QueueFull
from .following import Follower, Served

log = logging.getLogger("imgclf")
TOKEN_ENV = "IMGCLF_SERVE_TOKEN"


class BadRequest(Exception):
    """A request answered with `status` and `{"error": message}`; the service goes on."""

    def __init__(self, status: int, message: str, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.headers = status, headers


def _metrics():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    registry = CollectorRegistry()
    m = {
        "requests": Counter("imgclf_serve_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"],
                            registry=registry),
        "latency": Histogram("imgclf_serve_request_seconds", "Request latency", ["endpoint"], registry=registry,
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)),
        "batch": Histogram("imgclf_serve_batch_images", "Images per forward pass", registry=registry,
                           buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)),
        "forward": Histogram("imgclf_serve_forward_seconds", "Seconds per forward pass", registry=registry,
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1)),
        "queue": Gauge("imgclf_serve_queue_images", "Images waiting to be scored", registry=registry),
        "model": Gauge("imgclf_serve_model_info", "The model being served (1)", ["name", "version", "weights_sha256"],
                       registry=registry),
        "swaps": Counter("imgclf_serve_model_swaps", "Times the followed alias moved and the model was swapped",
                         registry=registry),
        "shadow_images": Counter("imgclf_serve_shadow_images", "Images the shadow model scored too",
                                 registry=registry),
        "shadow_agreed": Counter("imgclf_serve_shadow_agreed_images", "Images where the shadow gave the same class",
                                 registry=registry),
        "shadow_dropped": Counter("imgclf_serve_shadow_dropped_batches",
                                  "Batches the shadow had no room for (serve.shadow.queue)", registry=registry),
    }
    return registry, m


def decode_image(data: bytes, size: int, channels: int) -> np.ndarray:
    """One uploaded file as the model's float input, (C, H, W) in [0, 1], decoded as predict decodes a file."""
    from ..data.imagefolder import check_image, decode

    reason = check_image(io.BytesIO(data))
    if reason:
        raise BadRequest(413 if reason.startswith("too many pixels") else 400, f"the body is {reason}")
    return decode(io.BytesIO(data), size, channels).astype(np.float32) / 255.0


def multipart_files(content_type: str, body: bytes, limit: int) -> list[tuple[str, bytes]]:
    """(file name, bytes) of each part of a multipart/form-data body (the standard library's MIME parser)."""
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
                                                  + body)
    if not message.is_multipart():
        raise BadRequest(400, "a multipart body without parts (or without its boundary)")
    parts = [p for p in message.iter_parts() if p.get_content_disposition() in ("form-data", "attachment")]
    if not parts:
        raise BadRequest(400, "a multipart body with no file in it")
    if len(parts) > limit:
        raise BadRequest(413, f"{len(parts)} files in one request; serve.max_files is {limit}")
    return [(p.get_filename() or p.get_param("name", header="content-disposition") or f"file-{i}",
             p.get_payload(decode=True) or b"") for i, p in enumerate(parts)]


def tensor_input(payload: Any, in_shape: list[int]) -> np.ndarray:
    """`{"inputs"|"instances": nested lists}` as float32 (N, C, H, W), checked against the model's input."""
    if not isinstance(payload, dict) or not ({"inputs", "instances"} & payload.keys()):
        raise BadRequest(400, 'expected a JSON object with "inputs" (or "instances"): images as nested lists')
    try:
        x = np.asarray(payload.get("inputs", payload.get("instances")), dtype=np.float32)
    except (ValueError, TypeError):
        raise BadRequest(422, "inputs are not a numeric array of one shape (ragged or not numbers)") from None
    c, h, w = in_shape
    if x.ndim == 3 and c == 1:
        x = x[:, None]
    if x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w) or len(x) == 0:
        raise BadRequest(422, f"inputs of shape {list(x.shape)}; this model takes (N, {c}, {h}, {w})"
                              + (f" or (N, {h}, {w})" if c == 1 else ""))
    if not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0:
        raise BadRequest(422, "inputs must be finite and in [0, 1] (8-bit images divided by 255)")
    return x


def create_app(cfg: Config, model_uri: str, tracking_uri: str, token: Optional[str] = None,
               shadow_uri: Optional[str] = None):
    """`shadow_uri`: a second model every answered batch is also scored on, off the response path (shadow.py)."""
    from ..training.runtime import set_threads

    settings = cfg.serve
    set_threads(settings.threads)
    registry, metrics = _metrics()

    def on_swap(old: Served, new: Served) -> None:
        metrics["model"].remove(*_labels(old))
        metrics["model"].labels(*_labels(new)).set(1)
        metrics["swaps"].inc()

    follower = Follower(model_uri, tracking_uri, settings.poll_s, on_swap)
    shadow = None
    if shadow_uri:
        from .shadow import Shadow

        shadow = Shadow(Follower(shadow_uri, tracking_uri, settings.poll_s), cfg.tracking, settings.shadow,
                        on_scored=lambda n, agreed: (metrics["shadow_images"].inc(n), metrics["shadow_agreed"].inc(agreed)),
                        on_dropped=metrics["shadow_dropped"].inc)

    def score(images: np.ndarray):
        import torch

        served = follower.current  # read once per batch: a swap never splits a batch
        t0 = time.perf_counter()
        with torch.no_grad():
            probs = served.model.module(torch.from_numpy(images)).float().numpy()
        if shadow is not None:
            shadow.offer(images, probs, served, time.perf_counter() - t0)  # a put on a queue: it never waits
        return probs, served

    batcher = Batcher(score, settings.max_batch_size, settings.max_wait_ms / 1000.0, settings.queue_size,
                      on_batch=lambda n, s: (metrics["batch"].observe(n), metrics["forward"].observe(s)))
    metrics["queue"].set_function(lambda: batcher.queued)

    def load() -> None:
        try:
            served = follower.load()
        except Exception as exc:  # noqa: BLE001 - /readyz says why, then the service stops: nothing to serve
            app.state.load_error = one_line(exc)
            log.error("serve: %s could not be loaded: %s", model_uri, app.state.load_error)
            if app.state.server is not None:
                app.state.server.should_exit = True
            return
        metrics["model"].labels(*_labels(served)).set(1)
        follower.start()
        log.info("serve: ready, serving %s (v%s, weights %s...)", served.uri, served.version,
                 served.model.weights_sha256[:12])
        if shadow is not None:
            try:
                theirs = shadow.follower.load()
            except Exception as exc:  # noqa: BLE001 - serving goes on without a shadow; /readyz says why
                app.state.shadow_error = one_line(exc)
                log.error("serve: the shadow %s could not be loaded (%s); serving without it", shadow_uri,
                          app.state.shadow_error)
                return
            shadow.follower.start()
            shadow.start()
            log.info("serve: shadowing with %s (v%s)", theirs.uri, theirs.version)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        threading.Thread(target=load, name="model-load", daemon=True).start()
        yield
        follower.stop()
        await batcher.stop()
        if shadow is not None:  # after the batcher: every answered batch has been offered
            shadow.follower.stop()
            await asyncio.to_thread(shadow.stop)

    app = FastAPI(title="imgclf serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # one JSON line, not Starlette's plain-text 500
        log.error("serve: %s failed: %s", request.url.path, exc, exc_info=exc)
        return JSONResponse({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"},
                            status_code=500)

    app.add_middleware(_Observed, token=token, metrics=metrics)

    @app.get("/livez")
    async def livez():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        if follower.current is None:
            why = f"not loaded: {app.state.load_error}" if app.state.load_error else "loading"
            return JSONResponse({"status": why}, status_code=503)
        ready = {"status": "ready", "model": follower.current.describe()}
        if shadow is not None:
            theirs = shadow.follower.current
            ready["shadow"] = (theirs.describe() if theirs else
                               {"uri": shadow_uri, "status": app.state.shadow_error or "loading"})
        return ready

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def scored(images: np.ndarray):
        try:
            return await batcher.submit(images)
        except QueueFull as exc:
            raise BadRequest(503, f"busy: {exc}", {"Retry-After": "1"}) from None

    def answer(body: dict, served: Served):
        d = served.describe()
        headers = {"X-Model-Name": d["name"] or "", "X-Model-Version": d["version"] or "", "X-Model-Uri": d["uri"],
                   "X-Model-Weights-Sha256": d["weights_sha256"]}
        return JSONResponse({**body, "model": d}, headers=headers)

    def loaded() -> Served:
        if follower.current is None:
            raise BadRequest(503, "no model loaded yet; see /readyz")
        return follower.current

    @app.post("/predict")
    async def predict(request: Request):
        current, kind = loaded(), _content_type(request)
        if not (kind.startswith("image/") or kind in ("application/octet-stream", "multipart/form-data")):
            raise BadRequest(415, f"content type {kind or '(none)'!r}: send an image file (image/*, "
                                  "application/octet-stream) or multipart/form-data")
        body = await _read_body(request, settings)
        files = (multipart_files(request.headers["content-type"], body, settings.max_files)
                 if kind == "multipart/form-data" else [("body", body)])
        c, size, _ = current.model.in_shape
        images = []
        for name, data in files:  # decoded off the event loop: a large JPEG must not stall everyone else
            try:
                images.append(await asyncio.to_thread(decode_image, data, size, c))
            except BadRequest as exc:
                raise BadRequest(exc.status, f"{name}: {exc}" if kind == "multipart/form-data" else str(exc)) from None
        probs, served = await scored(np.stack(images))
        answers = [_answer(row, served, settings.top_k, cfg.evaluate.low_confidence) for row in probs]
        if kind != "multipart/form-data":
            return answer(answers[0], served)
        return answer({"predictions": [{"file": n, **a} for (n, _), a in zip(files, answers)]}, served)

    @app.post("/invocations")
    async def invocations(request: Request):
        current, kind = loaded(), _content_type(request)
        if kind != "application/json":
            raise BadRequest(415, f"content type {kind or '(none)'!r}: send application/json")
        body = await _read_body(request, settings)
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest(400, "the body is not JSON") from None
        probs, served = await scored(tensor_input(payload, current.model.in_shape))
        return answer({"predictions": probs.tolist()}, served)

    app.state.follower, app.state.batcher, app.state.load_error, app.state.server = follower, batcher, None, None
    app.state.shadow, app.state.shadow_error = shadow, None
    return app


class _Observed:
    """Counts and times every request, and asks for the bearer token (not on the probes). A plain ASGI
    middleware: Starlette's BaseHTTPMiddleware cost more per request than scoring one image does."""

    OPEN = ("/livez", "/readyz")
    COUNTED = ("/predict", "/invocations", "/livez", "/readyz", "/metrics")

    def __init__(self, app, token: Optional[str], metrics: dict):
        self.app, self.token, self.metrics = app, token, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, t0, status = scope["path"], time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.token and path not in self.OPEN and not _authorized(dict(scope["headers"]), self.token):
                await JSONResponse({"error": f"missing or wrong bearer token (${TOKEN_ENV})"}, status_code=401,
                                   headers={"WWW-Authenticate": "Bearer"})(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        finally:
            if path in self.COUNTED:
                self.metrics["requests"].labels(path, str(status[0])).inc()
                self.metrics["latency"].labels(path).observe(time.perf_counter() - t0)


def _labels(served: Served) -> tuple[str, str, str]:
    return served.name or served.uri, served.version or "", served.model.weights_sha256


def _content_type(request) -> str:
    """The media type alone, lower case (no parameters such as a boundary or a charset)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _authorized(headers: dict[bytes, bytes], token: str) -> bool:
    given = headers.get(b"authorization", b"")
    return given.startswith(b"Bearer ") and hmac.compare_digest(given[len(b"Bearer "):], token.encode())


def _answer(row: np.ndarray, served: Served, top_k: int, low_confidence: float) -> dict[str, Any]:
    classes = served.model.classes
    order = np.argsort(-row, kind="stable")[:top_k]
    best = int(order[0])
    return {"class": classes[best], "probability": float(row[best]), "low_confidence": bool(row[best] < low_confidence),
            "top_k": [{"class": classes[int(i)], "probability": float(row[int(i)])} for i in order]}


async def _read_body(request, settings) -> bytes:
    """The body, refused past serve.max_body_mb (by its Content-Length, or while it streams in) and from a
    client slower than serve.body_timeout_s to send it."""
    limit = int(settings.max_body_mb * 2**20)
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BadRequest(413, f"a body of {declared} bytes; serve.max_body_mb is {settings.max_body_mb:g}")
    chunks, size = [], 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(413, f"a body over serve.max_body_mb ({settings.max_body_mb:g} MiB)")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), settings.body_timeout_s)
    except TimeoutError:
        raise BadRequest(408, f"the body took longer than serve.body_timeout_s ({settings.body_timeout_s:g} s) "
                              "to arrive") from None
    if not size:
        raise BadRequest(400, "an empty body")
    return b"".join(chunks)
