"""Batch inference: records of images → records with predictions, with Ray Data or in this process.

With Ray (:func:`scored_stream`), one read task per input file streams it chunk by chunk
(:mod:`mnist_ray.score.records`) and an actor pool of :class:`Predictor`\\ s, each loading
the model once, scores the images; the driver receives one stream of small records,
without pixels (but for the few dozen per block the batch report may show). In this
process (:func:`local_stream`), for inputs too small to pay for starting Ray, a reader
thread and the model do the same. :func:`choose_executor` picks one of the two.

Inference runs the run's ``model.onnx`` with onnxruntime (:mod:`mnist_ray.onnx_model`):
no process of the scoring job imports TensorFlow. The model file is checked against the
contract before anything is written (:func:`load_scoring_model`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from mnist_ray import artifacts, digit_samples, onnx_model
from mnist_ray.config import LOCAL_SCORING_MAX_BYTES, InferenceOptions
from mnist_ray.data.schema import IMAGE, LABEL, NUM_CLASSES, ROW
from mnist_ray.score.records import ABSENT, FILE, IMAGE_ROW, KIND, PIXELS, PROBS, ChunkReader, read_files

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
# what starting an actor and loading the model costs).
BYTES_PER_ACTOR = 16 << 20


@dataclass(frozen=True)
class ScoringModel:
    """The model a batch scores with: where it came from, its ONNX bytes (sent to the actors), its id."""

    run_dir: Path
    model_file: bytes
    model_id: str  # the first 12 hex digits of the sha256 of model.onnx: what scored each row
    # The training data's class counts (metadata.json): the batch report's reference distribution.
    train_class_counts: list[int] | None = None
    # Which model: a registry version ("mnist-digits/3") or the run directory (mnist_ray.registry.versions).
    version: str | None = None


def load_scoring_model(run_dir: Path, *, version: str | None = None, int8: bool = False,
                       registered: bool = False) -> ScoringModel:
    """The ONNX model of a finished run (or of a registry version's fetched files), checked; raises
    ``InputError`` (exit 2) naming what is wrong with the run or the file, before anything is written.
    ``version`` says which model it is in the batch's records (default: the run directory); ``int8``
    takes the run's int8 copy (its version then ends in " int8"), and prints what it costs in accuracy;
    ``registered``: the files are a registry version's (for the messages)."""
    metadata = artifacts.check_scoring_run(run_dir)
    counts = metadata.get("data", {}).get("train_class_counts")
    model = onnx_model.read_run_model(run_dir, metadata, int8=int8, version=version if registered else None)
    version = version or str(run_dir)
    return ScoringModel(run_dir, model.data, model.sha256[: artifacts.MODEL_ID_CHARS], counts,
                        f"{version} int8" if int8 else version)


def choose_executor(requested: str, *, address: str | None, use_gpu: bool, input_bytes: int | None) -> str:
    """``ray`` or ``local`` for ``--executor requested``: ``auto`` is ``local`` only when no cluster
    is named, no GPU is asked for, and the inputs are known to total at most LOCAL_SCORING_MAX_BYTES."""
    if requested != "auto":
        return requested
    small = input_bytes is not None and input_bytes <= LOCAL_SCORING_MAX_BYTES
    return "local" if small and not address and not use_gpu else "ray"


def scored_stream(
    paths: list[str], model_file: bytes, options: InferenceOptions, *, input_bytes: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """Read, validate and score ``paths``; yield the records as numpy batches on the driver.

    ``model_file`` is the bytes of a checked ``model.onnx`` (sent to the actors, so the
    run directory need only exist where the driver runs). Each batch has:
    ``kind`` int8, ``file`` int32 (index into ``paths``), ``row`` int64,
    ``label`` int64 (``ABSENT`` when the file has none), ``image_id`` str ("" for none),
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
        # As many actors as the input keeps busy start at once (started one after another, each
        # would wait for the one before to load); Ray Data adds more, up to `concurrency`, while
        # work waits.
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


def local_stream(
    paths: list[str], model_file: bytes, options: InferenceOptions
) -> Iterator[dict[str, np.ndarray]]:
    """The records of :func:`scored_stream`, scored in this process, no Ray.

    For inputs too small to pay for starting Ray and its actors. A :class:`ChunkReader` thread
    reads and validates the next chunks while onnxruntime scores this one (both release the
    GIL for their heavy parts), so the two overlap as they do in the Ray pipeline.
    """
    session = onnx_model.session(model_file, threads=None, use_gpu=options.use_gpu)
    scorer = BatchScorer(session, options.batch_size)
    with ChunkReader(paths) as reader:
        yield from map(scorer, reader)


class Predictor:
    """Ray Data actor: loads the model once, then scores the image records of every batch."""

    def __init__(self, model_ref: list[ray.ObjectRef], batch_size: int, cpus: int, use_gpu: bool) -> None:
        # onnxruntime's threads = the CPUs Ray reserved for this actor: actors sharing a node must
        # not oversubscribe it.
        session = onnx_model.session(ray.get(model_ref[0]), threads=cpus, use_gpu=use_gpu)
        self.score = BatchScorer(session, batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.score(batch)


class BatchScorer:
    """Scores the image records of a batch of records with an onnxruntime session (in an actor or
    in-process), at most ``batch_size`` images per inference call (Ray Data's batches are that
    size already; the in-process path hands over whole chunks)."""

    def __init__(self, session, batch_size: int) -> None:
        self.session = session
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Add ``probs`` float32 (n, 10) (zeros for records that are not images); drop the pixels
        but those of the report's digit candidates (``pixels``: 784 bytes, else empty)."""
        is_image = batch[KIND] == IMAGE_ROW
        probs = np.zeros((len(is_image), NUM_CLASSES), np.float32)
        if is_image.any():
            # Raw uint8 pixels: scaling is the model's first layer, as in training.
            probs[is_image] = onnx_model.predict(self.session, batch[IMAGE][is_image], self.batch_size)
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
