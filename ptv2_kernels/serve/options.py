"""``ptv2 serve RUN [RUN ...]``: the command line (argparse only, so ``ptv2 --help`` stays light) and
the command."""

from __future__ import annotations

import argparse
import socket

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_BATCH_TIMEOUT_MS = 5.0
DEFAULT_MAX_BODY_BYTES = 64 * 1024  # a SQuAD context is a few KiB; tokenizing more than this per request buys nothing

EXAMPLES = """\
examples:
  ptv2 serve runs/sst2-prefix runs/cb-prefix          # two runs of one backbone, one bank
  ptv2 serve runs/rte,cb-prefix                       # a bank run serves each of its tasks
  ptv2 serve pos=runs/a neg=runs/b                    # NAME=RUN: two runs of the same task, named
  curl -s 127.0.0.1:8000/predict -d '{"task": "cb", "text": "It rains.", "text_pair": "It is dry."}'
  ptv2 serve e2e=runs/e2e dart=runs/dart              # generation runs answer POST /generate
  curl -s 127.0.0.1:8000/generate -d '{"task": "e2e", "text": "name[Aromi] food[Italian]"}'
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run folders written by `ptv2 train` (or their best/), on one backbone; NAME=RUN serves a "
                        "single-task run under NAME. Runs are named here only: no request can load one")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}, this machine only; the server has no "
                        "authentication)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free port")
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                   help=f"most requests in one backbone pass (default {DEFAULT_MAX_BATCH_SIZE})")
    p.add_argument("--batch-timeout-ms", type=float, default=DEFAULT_BATCH_TIMEOUT_MS,
                   help="how long a batch waits for more requests after its first "
                        f"(default {DEFAULT_BATCH_TIMEOUT_MS:g})")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"largest request body accepted (default {DEFAULT_MAX_BODY_BYTES})")
    p.add_argument("--device", default=None, help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of the model (default: the cores not already busy)")


def serve(ns: argparse.Namespace) -> int:
    """Check every value, load and stack the runs, then serve until SIGINT or SIGTERM."""
    from ..train.config import ConfigError, check_device
    from ..train.threads import configure_threads
    try:
        from .app import build_app, is_loopback, make_server
    except ImportError as e:
        raise ValueError(f"ptv2 serve needs the serve extra: pip install 'ptv2-kernels[train,serve]' ({e})") from None
    from .bank import load_bank

    for field, value, low in (("port", ns.port, 0), ("max_batch_size", ns.max_batch_size, 1),
                              ("batch_timeout_ms", ns.batch_timeout_ms, 0), ("max_body_bytes", ns.max_body_bytes, 1),
                              ("threads", ns.threads if ns.threads is not None else 1, 1)):
        if value < low:
            raise ConfigError(field, f"must be >= {low}, got {value}")
    if ns.port > 65535:
        raise ConfigError("port", f"must be <= 65535, got {ns.port}")
    check_device(ns.device)
    threads, source = configure_threads(ns.threads)
    bank = load_bank(ns.runs, ns.device)
    app = build_app(bank, max_batch_size=ns.max_batch_size, batch_timeout_ms=ns.batch_timeout_ms,
                    max_body_bytes=ns.max_body_bytes, threads=threads)
    try:
        server, sock = make_server(app, ns.host, ns.port)
    except socket.gaierror as e:
        raise ConfigError("host", f"must be an address or a name this machine resolves, got {ns.host!r} ({e})") from None
    except OSError as e:
        raise ConfigError("port", f"must be free to listen on at {ns.host}, got {ns.port} ({e.strerror})") from None
    host, port = sock.getsockname()[:2]
    print(f"ptv2 serve: {len(bank.tasks)} task(s) ({', '.join(bank.tasks)}) from {len(bank.runs)} run(s) in one bank "
          f"on {bank.backbone_name}; {threads} thread(s) ({source}); batches of up to {ns.max_batch_size} within "
          f"{ns.batch_timeout_ms:g} ms; listening on http://{host}:{port}", flush=True)
    if not is_loopback(ns.host):
        print(f"ptv2 serve: warning: --host {ns.host} is reachable from other machines and the server has no "
              "authentication", flush=True)
    server.run(sockets=[sock])
    return 0
