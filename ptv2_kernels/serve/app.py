"""The HTTP server: Starlette endpoints on uvicorn, requests batched by :class:`~.batcher.Batcher`.

- ``POST /predict`` ``{"task", "text", "text_pair"}`` -> what ``ptv2 predict`` writes for that row, plus
  ``"task"``; a bad request -> 4xx ``{"error": "..."}`` naming what was wrong (:mod:`.requests`); an
  input longer than its run's maximum length is refused, never truncated.
- ``POST /generate`` ``{"task", "text"}`` for a server of generation runs -> ``{"generation", "task"}``
  (the run's beams and length; rows of several tasks generate in one ``generate()``); each endpoint
  answers 422 naming the other for a task of the other kind.
- ``GET /health`` -> ``{"status": "ok", "backbone", "tasks"}``.
- ``GET /metrics`` -> Prometheus text (:mod:`.metrics`).

Shutdown (SIGINT or SIGTERM) stops accepting connections, answers every request already received (uvicorn
waits for them before the lifespan ends), then runs what is still queued and stops the batcher.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import time
from typing import Optional, Tuple

import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .batcher import Batcher
from .metrics import INVALID_TASK, Metrics
from .options import DEFAULT_BATCH_TIMEOUT_MS, DEFAULT_HOST, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_BODY_BYTES, DEFAULT_PORT
from .requests import RequestError, parse_request

log = logging.getLogger("ptv2_kernels.serve")


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past ``limit`` bytes without reading the rest."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"body must be at most {limit} bytes, got {declared}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body must be at most {limit} bytes, got more")
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(bank, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
              batch_timeout_ms: float = DEFAULT_BATCH_TIMEOUT_MS, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              threads: Optional[int] = None) -> Starlette:
    """The ASGI app serving ``bank`` (a :class:`~.bank.Bank`, or anything with its ``tasks``,
    ``backbone_name``, ``prepare(task, text, text_pair)`` returning an item with ``entry.name``, and
    ``run(items)``: the load benchmark serves PEFT through the same app); ``threads``: torch's CPU
    threads in the batch worker thread."""
    metrics = Metrics(max_batch_size)
    batcher = Batcher(bank.run, max_batch_size, batch_timeout_ms / 1000.0,
                      on_batch=lambda items, s: metrics.batch([p.entry.name for p in items], s),
                      thread_init=(lambda: torch.set_num_threads(threads)) if threads else None)

    generates = getattr(bank, "generates", False)

    def endpoint(path: str, for_generation: bool):
        other = "/predict" if for_generation else "/generate"

        async def answer(request: Request) -> JSONResponse:
            t0, task = time.perf_counter(), INVALID_TASK
            try:
                name, text, pair = parse_request(await _body(request, max_body_bytes), bank.tasks)
                task = name
                if generates != for_generation:
                    raise RequestError(422, f"task {name!r} {'does not generate' if for_generation else 'generates text'}: "
                                            f"POST {other}")
                status, payload = 200, await batcher.submit(bank.prepare(name, text, pair))
            except RequestError as e:
                status, payload = e.status, {"error": str(e)}
            except Exception as e:  # noqa: BLE001 - answered as a 500; the server keeps serving
                log.exception("%s failed", path)
                status, payload = 500, {"error": f"internal error ({type(e).__name__}); the server logged it"}
            metrics.request(task, status, time.perf_counter() - t0)
            return JSONResponse(payload, status_code=status)

        return Route(path, answer, methods=["POST"])

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "backbone": bank.backbone_name, "tasks": bank.tasks})

    async def metrics_text(request: Request) -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}"}, status_code=exc.status_code)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    return Starlette(routes=[endpoint("/predict", False), endpoint("/generate", True),
                             Route("/health", health, methods=["GET"]), Route("/metrics", metrics_text, methods=["GET"])],
                     exception_handlers={HTTPException: http_error}, lifespan=lifespan)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port); ``socket.gaierror`` for a host
    that does not resolve, ``OSError`` for a port that cannot be had."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def make_server(app: Starlette, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> Tuple[object, socket.socket]:
    """``(uvicorn server, its listening socket)``; ``server.run(sockets=[sock])`` serves until SIGINT or
    SIGTERM (or ``server.should_exit = True``)."""
    import uvicorn

    sock = listen(host, port)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    return uvicorn.Server(config), sock
