"""Batch inference with Ray Data: CSV files → validated rows → predictions, streamed to the driver.

One read task per input file streams it chunk by chunk (:class:`~mnist_ray.csv_format.CsvChunks`),
so memory does not grow with the file. An actor pool of :class:`Predictor`\\ s, each
loading the model once, scores the images. The driver receives one stream of
small records, without pixels (but for the few dozen per block the batch report
may show), from which it writes Parquet and counts.

Every record has a ``kind``:

* ``IMAGE_ROW`` — a valid image and its prediction;
* ``REJECTED_ROW`` — a row that failed validation: ``reason`` and ``raw`` say why and what;
* ``REJECTED_FILE`` — the file could not be read (further): bad header, binary, corrupt gzip;
* ``END_OF_FILE`` — the reader finished the file: ``row`` holds the number of data
  lines it read and ``raw`` a JSON object with the ``sha256`` and ``size`` of the bytes
  read and whether that was the ``whole_file``. The driver checks rows in = images +
  rejected rows against it, independently of how the records travelled, and that the
  file did not change since it hashed it.

Records of one file may arrive in any order (several actors); each carries its
file's index in ``file`` and its 1-based data row in ``row``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, Queue

import numpy as np
import ray

# mnist_ray first: it selects tf-keras before TensorFlow loads, in every worker that unpickles this module.
from mnist_ray import artifacts, digit_samples
from mnist_ray.config import LOCAL_SCORING_MAX_BYTES
from mnist_ray.csv_format import CsvChunks, RowProblem
from mnist_ray.schema import IMAGE_SHAPE, NUM_CLASSES, DataValidationError

# Columns of the stream.
KIND, FILE, ROW, IMAGE, LABEL, IMAGE_ID, REASON, RAW = (
    "kind", "file", "row", "image", "label", "image_id", "reason", "raw"
)
PROBS = "probs"
PIXELS = "pixels"
IMAGE_ROW, REJECTED_ROW, REJECTED_FILE, END_OF_FILE = 0, 1, 2, 3
# label / image_id of a record whose file has no such column (ids are checked to be >= 0).
ABSENT = -1
# Blocks of ~40,000 images: results reach the driver (and its progress lines) every few seconds.
BLOCK_BYTES = 32 << 20
# Peak heap of a read task: a chunk being parsed (~60 MB) and a block being filled.
READ_TASK_MEMORY = 512 << 20
# Parsing a row costs about a tenth of scoring it on a CPU: a whole CPU reserved per read task
# would sit mostly idle and keep an inference actor from starting. Read tasks reserve none, and
# their number is capped instead (READ_TASKS_PER_CPU per CPU in the cluster).
READ_TASK_CPUS = 0
READ_TASKS_PER_CPU = 1
# Blocks in flight between readers, actors and the driver: enough to keep every actor busy, and
# fixed, so that memory does not grow with the input (Ray Data's default is a share of the node's RAM).
IN_FLIGHT_BYTES_PER_ACTOR = 256 << 20
# Input worth starting an actor for: ~9,000 CSV rows, a few seconds of one actor's work (about
# what loading TensorFlow and the model costs it).
BYTES_PER_ACTOR = 16 << 20
# Chunks read and validated ahead of inference by the in-process path (~4,400 rows, ~4 MB of
# records each). Not started before the model has loaded: reading then slowed TensorFlow's
# import (both hold the GIL for much of their work) by as much as it read ahead.
LOCAL_READ_AHEAD = 4


def choose_executor(requested: str, *, address: str | None, use_gpu: bool, input_bytes: int | None) -> str:
    """``ray`` or ``local`` for ``--executor requested``: ``auto`` is ``local`` only when no cluster
    is named, no GPU is asked for, and the inputs are known to total at most LOCAL_SCORING_MAX_BYTES."""
    if requested != "auto":
        return requested
    small = input_bytes is not None and input_bytes <= LOCAL_SCORING_MAX_BYTES
    return "local" if small and not address and not use_gpu else "ray"


@dataclass(frozen=True)
class InferenceOptions:
    """How the actor pool runs: up to ``concurrency`` actors × ``cpus_per_actor`` CPUs (+ 1 GPU each).

    ``concurrency`` None means as many actors as the cluster has room for (see :meth:`resolved`).
    """

    batch_size: int = 1024
    concurrency: int | None = None
    cpus_per_actor: int = 1
    use_gpu: bool = False

    def resolved(self, cluster: dict[str, float]) -> InferenceOptions:
        """These options with ``concurrency`` None (auto) set to as many actors as ``cluster`` holds."""
        if self.concurrency is not None:
            return self
        if self.use_gpu:
            fits = int(cluster.get("GPU", 0))
        else:
            fits = int(cluster.get("CPU", 0)) // self.cpus_per_actor
        return dataclasses.replace(self, concurrency=max(1, fits))


def scored_stream(
    paths: list[str], model_file: bytes, options: InferenceOptions, *, input_bytes: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Read, validate and score ``paths``; yield the records as numpy batches on the driver.

    ``model_file`` is the bytes of a ``model.keras`` (sent to the actors, so the
    run directory need only exist where the driver runs). Each batch has:
    ``kind`` int8, ``file`` int32 (index into ``paths``), ``row`` int64,
    ``label`` and ``image_id`` int64 (``ABSENT`` when the file has none),
    ``reason`` and ``raw`` str, ``probs`` float32 (n, 10) (zeros for records
    that are not images), ``pixels`` bytes (an image's 784 uint8 pixels where it is a
    candidate for the report's digit grids, else empty). ``input_bytes`` (the inputs'
    stored size, if known) sizes the actor pool that starts right away.
    """
    options = options.resolved(ray.cluster_resources())
    # Through the object store, held here for the whole run: actors fetch it once each.
    model_ref = ray.put(model_file)
    files = ray.data.from_items(
        [{"path": p, FILE: i} for i, p in enumerate(paths)], override_num_blocks=len(paths)
    )
    # Reads are tasks of their own, in parallel with the actors: a declared memory need (which
    # the actors do not share) also keeps Ray Data from fusing reading into the inference actors,
    # where a GPU would wait while its actor parses CSV.
    read_tasks = max(1, int(ray.cluster_resources().get("CPU", 1)) * READ_TASKS_PER_CPU)
    records = files.map_batches(
        read_files, batch_size=1, batch_format="numpy", memory=READ_TASK_MEMORY,
        num_cpus=READ_TASK_CPUS, compute=ray.data.TaskPoolStrategy(size=min(read_tasks, len(paths))),
    )
    scored = records.map_batches(
        Predictor,
        # In a list, so that Ray passes the reference itself rather than inlining 2 MB per actor.
        fn_constructor_kwargs={
            "model_ref": [model_ref], "batch_size": options.batch_size, "cpus": options.cpus_per_actor,
            "use_gpu": options.use_gpu,
        },
        # As many actors as the input keeps busy start at once (each takes seconds to load
        # TensorFlow and the model: started one after another, they would cost that many times);
        # Ray Data adds more, up to `concurrency`, while work waits.
        compute=ray.data.ActorPoolStrategy(
            min_size=min(options.concurrency, max(1, -(-input_bytes // BYTES_PER_ACTOR))),
            max_size=options.concurrency,
        ),
        batch_size=options.batch_size,
        batch_format="numpy",
        num_cpus=options.cpus_per_actor,
        num_gpus=1 if options.use_gpu else None,
    )
    _bound_memory(scored.context, options)
    yield from scored.iter_batches(batch_size=None, batch_format="numpy")


def _bound_memory(context: ray.data.DataContext, options: InferenceOptions) -> None:
    """Smaller blocks and a fixed budget of blocks in flight, for this dataset only."""
    context.target_max_block_size = BLOCK_BYTES
    limits = context.execution_options.resource_limits
    in_flight = IN_FLIGHT_BYTES_PER_ACTOR * (options.concurrency + 1)
    context.execution_options.resource_limits = limits.copy(object_store_memory=in_flight)


def local_stream(paths: list[str], model, options: InferenceOptions) -> Iterator[dict[str, np.ndarray]]:
    """The records of :func:`scored_stream`, scored in this process with ``model`` (loaded), no Ray.

    For inputs too small to pay for starting Ray and its actors. A :class:`ChunkReader` thread
    reads and validates the next chunks while TensorFlow scores this one (both release the
    GIL for their heavy parts), so the two overlap as they do in the Ray pipeline.
    """
    scorer = BatchScorer(model, options.batch_size)
    with ChunkReader(paths) as reader:
        yield from map(scorer, reader)


class ChunkReader:
    """The records of :func:`file_records` for ``paths`` in turn, read by a thread up to ``depth``
    chunks ahead of the consumer (so memory does not grow with the input).

    Iterate it once; the thread's errors are raised to the consumer after the records read
    before them. ``close`` (or leaving a ``with``) stops the thread.
    """

    def __init__(self, paths: list[str], *, depth: int = LOCAL_READ_AHEAD) -> None:
        self.paths = list(paths)
        self._queue: Queue = Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="csv-read-ahead", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for index, path in enumerate(self.paths):
                for records in file_records(path, index):
                    if self._stop.is_set():
                        return
                    self._queue.put(records)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._queue.put(exc)
            return
        self._queue.put(None)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        try:
            while (item := self._queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a producer waiting on a full queue, then let it end
            with contextlib.suppress(Empty):
                self._queue.get_nowait()
            self._thread.join(timeout=0.1)

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- reading (Ray Data tasks, one per file) -----------------------------------------------------


def read_files(batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: the files named in ``batch`` (``path``, ``file``) → records, one block per chunk."""
    for path, index in zip(batch["path"].tolist(), batch[FILE].tolist(), strict=True):
        yield from file_records(str(path), int(index))


def file_records(path: str, index: int) -> Iterator[dict[str, np.ndarray]]:
    """The records of one file: its images and rejected rows chunk by chunk, then its end.

    A problem with the file as a whole becomes one ``REJECTED_FILE`` record;
    rows read before it (a gzip stream damaged midway) are kept.
    """
    chunks = CsvChunks(path, require_label=False, read_id=True)
    try:
        for valid, rejects in chunks:
            if len(valid["row"]) or rejects:
                yield _chunk_records(index, valid, rejects)
        if not chunks.data_lines:
            raise DataValidationError("has a header but no data rows", source=path)
    except DataValidationError as exc:
        yield _records(index, REJECTED_FILE, rows=[0], reasons=[file_problem(exc)], raws=[""])
    summary = json.dumps({"sha256": chunks.sha256, "size": chunks.size, "whole_file": chunks.read_to_end})
    yield _records(index, END_OF_FILE, rows=[chunks.data_lines], reasons=[""], raws=[summary])


def file_problem(error: DataValidationError) -> str:
    """The error's message without the file name (which has its own column)."""
    return str(error).removeprefix(error.source).lstrip(",: ")


def _chunk_records(
    index: int, valid: dict[str, np.ndarray], rejects: list[RowProblem]
) -> dict[str, np.ndarray]:
    n = len(valid["row"])
    images = _records(
        index, IMAGE_ROW, rows=valid["row"], reasons=[""] * n, raws=[""] * n, images=valid["image"],
        labels=valid.get(LABEL), image_ids=valid.get(IMAGE_ID),
    )
    if not rejects:
        return images
    bad = _records(
        index, REJECTED_ROW, rows=np.array([r.row for r in rejects], np.int64),
        reasons=[r.reason for r in rejects], raws=[r.raw for r in rejects],
    )
    return {key: np.concatenate([images[key], bad[key]]) for key in images}


def _records(
    index: int,
    kind: int,
    *,
    rows: np.ndarray | list[int],
    reasons: list[str],
    raws: list[str],
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    image_ids: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    n = len(rows)
    absent = np.full(n, ABSENT, np.int64)
    return {
        KIND: np.full(n, kind, np.int8),
        FILE: np.full(n, index, np.int32),
        ROW: np.asarray(rows, np.int64),
        # Records that are not images carry blank pixels: one schema for every block.
        IMAGE: images if images is not None else np.zeros((n, *IMAGE_SHAPE), np.uint8),
        LABEL: labels if labels is not None else absent,
        IMAGE_ID: image_ids if image_ids is not None else absent,
        REASON: np.array(reasons, dtype=object),
        RAW: np.array(raws, dtype=object),
    }


# --- inference (Ray Data actors) ----------------------------------------------------------------


class Predictor:
    """Ray Data actor: loads the model once, then scores the image records of every batch."""

    def __init__(self, model_ref: list[ray.ObjectRef], batch_size: int, cpus: int, use_gpu: bool) -> None:
        _configure_tensorflow(cpus, use_gpu)
        self.score = BatchScorer(load_model_file(ray.get(model_ref[0])), batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.score(batch)


class BatchScorer:
    """Scores the image records of a batch of records with a loaded model (in an actor or in-process),
    at most ``batch_size`` images per inference call (Ray Data's batches are that size already;
    the in-process path hands over whole chunks)."""

    def __init__(self, model, batch_size: int) -> None:
        import tensorflow as tf

        self.batch_size = batch_size
        # One traced graph for every batch size (the last batch of a file is smaller): ~15% faster
        # than predict_on_batch, which goes through Keras' per-call data handling.
        self.forward = tf.function(
            lambda images: model(images, training=False),
            input_signature=[tf.TensorSpec((None, *IMAGE_SHAPE), tf.uint8)],
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Add ``probs`` float32 (n, 10) (zeros for records that are not images); drop the pixels
        but those of the report's digit candidates (``pixels``: 784 bytes, else empty)."""
        is_image = batch[KIND] == IMAGE_ROW
        probs = np.zeros((len(is_image), NUM_CLASSES), np.float32)
        if is_image.any():
            # Raw uint8 pixels: scaling is the model's first layer, as in training.
            images, size = batch[IMAGE][is_image], self.batch_size
            probs[is_image] = np.concatenate(
                [self.forward(images[i:i + size]).numpy() for i in range(0, len(images), size)]
            )
        out = {key: value for key, value in batch.items() if key != IMAGE}
        out[PROBS] = probs
        out[PIXELS] = report_candidate_pixels(batch, probs, is_image)
        return out


def report_candidate_pixels(
    batch: dict[str, np.ndarray], probs: np.ndarray, is_image: np.ndarray
) -> np.ndarray:
    """Pixels (bytes) of the images that may be shown in the batch report; empty bytes for the rest.

    Kept here rather than re-read from the inputs later: a night's files are often
    moved away after scoring, and a report must re-render from the output alone.
    Per block, at most 3 × PER_SET images (see :mod:`mnist_ray.digit_samples`).
    """
    pixels = np.full(len(is_image), b"", dtype=object)
    labels = batch[LABEL]
    keys = digit_samples.set_keys(
        batch[FILE].astype(np.int64), batch[ROW], labels != ABSENT, probs.argmax(axis=1), labels,
        probs.max(axis=1),
    )
    keep = digit_samples.candidates({name: np.where(is_image, key, np.inf) for name, key in keys.items()})
    for i in np.flatnonzero(keep).tolist():
        pixels[i] = batch[IMAGE][i].tobytes()
    return pixels


def load_model_file(model_file: bytes):
    """A tf-keras model from the bytes of a ``model.keras``, via ``artifacts.load_model`` (safe mode)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / artifacts.MODEL_FILE).write_bytes(model_file)
        return artifacts.load_model(tmp)


def _configure_tensorflow(cpus: int, use_gpu: bool) -> None:
    import tensorflow as tf

    # Threads = the CPUs Ray reserved for this actor: actors sharing a node must not oversubscribe it.
    tf.config.threading.set_intra_op_parallelism_threads(cpus)
    tf.config.threading.set_inter_op_parallelism_threads(max(2, cpus))
    if use_gpu:
        enable_gpu_memory_growth()


def enable_gpu_memory_growth() -> None:
    """Let TensorFlow take GPU memory as it needs it, not all of it up front (before any op runs).

    In the actors, so that those sharing a GPU node can all load; in the job's own process
    (safe-mode check, in-process scoring), so that it does not starve the actors beside it.
    """
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            return  # TensorFlow already ran in this process (its devices are set): too late, and harmless
