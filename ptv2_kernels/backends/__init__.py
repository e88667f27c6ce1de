"""Backend registry and dispatch.

Each backend module exposes ``BACKEND``, a :class:`~ptv2_kernels.backends.base.Backend`. Modules are
imported lazily so the package imports without Triton, without the compiled extension and without a
GPU; a backend whose module cannot be imported is reported as unavailable with the import error.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Optional, Set

from .base import Backend, Params, Problem

NAMES = ("cuda", "triton", "flash", "torch")

# Tried in this order when ``backend=None``. On GPUs the Triton kernels come first until the CUDA
# backend is measured faster on the benchmark grid; on CPU the flash backend (the platform's flash
# kernel over [prefix; tokens]) is the fastest measured, and the Triton interpreter is for tests.
PRIORITY = {"cuda": ("triton", "cuda", "torch"), "cpu": ("flash", "torch", "triton")}
_DEFAULT_PRIORITY = ("torch",)

_cache: dict = {}
_recorders: list = []  # the sets of record_choices() blocks now open


@contextlib.contextmanager
def record_choices():
    """Inside the block, the names of the backends :func:`select` picks are added to the set it
    yields (what a training run reports as the backend used)."""
    names: Set[str] = set()
    _recorders.append(names)
    try:
        yield names
    finally:
        _recorders.remove(names)


def _record(backend: Backend) -> Backend:
    for names in _recorders:
        names.add(backend.name)
    return backend


class _Unimportable(Backend):
    def __init__(self, name: str, error: BaseException):
        self.name = name
        self._why = f"cannot be imported ({type(error).__name__}: {error})"

    def availability(self) -> Optional[str]:
        return self._why


def get(name: str) -> Backend:
    """The backend called ``name``; raises ValueError for an unknown name."""
    if name not in NAMES:
        raise ValueError(f"backend must be one of {', '.join(NAMES)} or None, got {name!r}")
    if name not in _cache:
        try:
            _cache[name] = importlib.import_module(f"{__name__}.{name}").BACKEND
        except Exception as e:  # an optional dependency missing or broken: report, do not fail import
            _cache[name] = _Unimportable(name, e)
    return _cache[name]


class NoBackendError(ValueError):
    """No backend can run the given inputs; the message lists every backend's reason."""


def select(problem: Problem, name: Optional[str] = None) -> Backend:
    """The backend named ``name`` if it can run ``problem``, else the first that can in priority order."""
    if name is not None:
        backend = get(name)
        why = backend.reason(problem)
        if why:
            raise NoBackendError(f"backend={name!r} cannot run these inputs: it {why}")
        return _record(backend) if _recorders else backend
    order = PRIORITY.get(problem.device.type, _DEFAULT_PRIORITY)
    reasons = []
    for candidate in order:
        backend = get(candidate)
        why = backend.reason(problem)
        if why is None:
            return _record(backend) if _recorders else backend
        reasons.append(f"  {candidate}: {why}")
    for other in NAMES:
        if other not in order:
            reasons.append(f"  {other}: {get(other).reason(problem) or 'not tried on this device'}")
    raise NoBackendError("no backend can run prefix_attention on these inputs:\n" + "\n".join(reasons))


# Resolve every backend now (a few ms; failures are recorded, not raised) rather than at the first
# call: a first call traced by torch.compile(fullgraph=True) cannot run an import.
for _name in NAMES:
    get(_name)

__all__ = ["Backend", "Params", "Problem", "NAMES", "PRIORITY", "NoBackendError", "get", "select", "record_choices"]
