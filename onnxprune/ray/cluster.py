"""Connecting to Ray: a local instance or a cluster address, quiet logs, errors made one line."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from onnxprune.errors import InputError, OnnxPruneError

RAY_EXTRA = "pip install 'onnxprune[ray]'"
RETRIES = 3
"""Retries of a sweep task whose worker process died (a crash, the OOM killer, a lost node)."""


def require_ray(what: str = "--ray"):
    """The `ray` module, or one line naming the extra."""
    try:
        import pyarrow  # noqa: F401  (Ray Data needs it; checked here for a clear message)
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise InputError(f"{what} needs the ray extra: {RAY_EXTRA}") from None
    return ray


@contextlib.contextmanager
def connected(address: str | None, workers: int, quiet: bool = True) -> Iterator[None]:
    """Use the running Ray, or join `address` (`ray://head:10001`, `auto`), or (None or 'local', what
    a bare `--ray` gives) start a local one with at least `workers` CPUs; a Ray started here is shut
    down on exit."""
    ray = require_ray()
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    started = not ray.is_initialized()
    if started:
        options = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=not quiet)
        if address in (None, "local"):
            options["num_cpus"] = max(workers, os.cpu_count() or 1)
        else:
            options["address"] = address
        try:
            ray.init(**options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise InputError(f"cannot connect to Ray at {address}: {str(exc).splitlines()[0][:200]}") from None
    quiet_data(quiet)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def quiet_data(quiet: bool) -> None:
    """No progress bars or execution banners from Ray Data when quiet."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = not quiet
    if quiet:
        logging.getLogger("ray.data").setLevel(logging.ERROR)


@contextlib.contextmanager
def worker_errors() -> Iterator[None]:
    """Re-raise an onnxprune error from a worker as itself: Ray wraps it in its own types (whose
    message carries the remote traceback), and the CLI must still print one line and exit 2."""
    try:
        yield
    except Exception as exc:
        found = _cause(exc)
        if found is None or found is exc:
            raise
        raise found from None


def _cause(exc: BaseException | None) -> OnnxPruneError | None:
    """The innermost onnxprune error in Ray's `cause` / `__cause__` chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None)
        if not isinstance(inner, BaseException):
            if isinstance(exc, OnnxPruneError):
                return exc
            inner = exc.__cause__
        exc = inner
    return None
