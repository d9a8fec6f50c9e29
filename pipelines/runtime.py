"""Connecting to Ray the same way from every entry point (pipelines, train, serve, quickstart).

With RAY_ADDRESS (or --address) we join that cluster; otherwise an embedded local Ray is started.
Ray 2.60 turns token authentication on for new local clusters; an embedded cluster that only this
process talks to gets RAY_AUTH_MODE=disabled unless the user set a mode deliberately.
"""

from __future__ import annotations

import logging
import os
import sys


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, object_store_mb: int | None = None,
               dashboard: bool = True, quiet: bool = True):
    """Return the connected `ray` module, starting an embedded local cluster when no address is given."""
    import ray

    if quiet:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    kwargs = {"log_to_driver": not quiet, "logging_level": logging.WARNING if quiet else logging.INFO}
    if address:
        ray.init(address=address, **kwargs)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # Logical CPUs: at least 4 so that training workers, data tasks and Serve replicas can
        # coexist on a small machine instead of waiting on each other for a CPU forever.
        num_cpus = num_cpus or max(4, os.cpu_count() or 1)
        ray.init(num_cpus=num_cpus, include_dashboard=dashboard,
                 object_store_memory=object_store_mb * 2**20 if object_store_mb else None, **kwargs)
    return ray


def dashboard_url() -> str | None:
    import ray

    try:
        url = ray._private.worker.get_dashboard_url()  # Ray 2.60 has no public accessor
    except Exception:
        return None
    return f"http://{url}" if url and not url.startswith("http") else url


def progress_bars_wanted() -> bool:
    """Progress bars in an interactive terminal, never in CI logs."""
    return sys.stderr.isatty() and not os.environ.get("CI")
