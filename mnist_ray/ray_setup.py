"""Connecting a job to Ray: the cluster it names, or a Ray started on this machine."""

from __future__ import annotations

import logging

import ray


def connect_ray(address: str | None) -> None:
    """Connect to ``address`` (a cluster) or, if None, start Ray on this machine."""
    if not ray.is_initialized():
        ray.init(address=address, logging_level="WARNING")
    # First use of ray.data (it configures its loggers on import), then quieten it:
    # Ray Data logs every dataset execution at INFO, noise next to our progress lines.
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
