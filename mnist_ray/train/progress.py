"""How a training job talks to its user while Ray Train runs: progress lines and prompt signals.

* :class:`Progress` — the workers' lines (where each runs, one per epoch) reach the job through a
  queue, since the job does not forward Ray workers' own output (see :mod:`mnist_ray.runtime`);
* :func:`in_background` — the run waits in a thread, so that SIGTERM and Ctrl+C act at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Progress:
    """The workers' progress lines, printed by the driver as they arrive.

    The jobs do not forward the Ray workers' own output to the driver (``log_to_driver=False``:
    it is mostly Ray's and TensorFlow's start-up talk), so the lines a user should read
    travel through a queue (a small Ray actor) instead: where each worker runs, then one
    line per epoch from rank 0.
    """

    def __init__(self) -> None:
        from ray.util.queue import Queue

        from mnist_ray.runtime import beside_the_driver

        # No CPU: the queue must not take one that a training worker waits for; on the job's node:
        # a worker node lost mid-run must not take the queue with it.
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": beside_the_driver()})
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._print, name="train-progress", daemon=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)
        self._print_waiting()
        self.queue.shutdown()

    def _print(self) -> None:
        from ray.util.queue import Empty

        while not self._done.is_set():
            try:
                line = self.queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:  # the queue's actor is gone (Ray shutting down): nothing more will come
                return
            print(line, flush=True)

    def _print_waiting(self) -> None:
        try:
            for line in self.queue.get_nowait_batch(self.queue.qsize()):
                print(line, flush=True)
        except Exception:  # the queue's actor is gone: what it held is lost with it
            pass


def say(progress, line: str) -> None:
    """Send a progress line to the driver (:class:`Progress`); a Tune trial (``progress`` None)
    reports through Tune instead."""
    if progress is None:
        return
    from ray.exceptions import RayActorError

    try:
        progress.put(line)
    except RayActorError:  # the queue is gone (the job is ending): a progress line never fails training
        pass


def in_background(work: Callable[[], T]) -> T:
    """``work()``, run in a thread while this (the main) thread waits for it in short steps.

    Ray Train blocks its caller in one ``ray.get`` for the whole run, in C++ code that does
    not let Python's signal handlers run (seen: a SIGTERM at epoch 1 of 30 took effect after
    epoch 30). Waiting here instead, the main thread handles SIGTERM and Ctrl+C at once; the
    job then shuts Ray down, which ends the run (its checkpoints stay, for --resume).
    """
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # handed to the waiting thread, which raises it
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
