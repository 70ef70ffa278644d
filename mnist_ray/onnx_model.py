"""The portable model (``model.onnx``): its contract, a safe check of a file against it, and a session.

Scoring, serving and the promotion gate run the ONNX model with onnxruntime and never
import TensorFlow (its import and a model load cost ~4 s and ~700 MB per process; an
onnxruntime session ~0.5 s and ~240 MB, measured here). The file takes uint8 pixels
``pixels`` (n, 28, 28) and returns float32 probabilities ``probs`` (n, 10), as the Keras
model does. An ONNX file carries no code, but a file is still refused unless it has exactly
that signature and uses only the standard operator sets: a custom operator is code that a
runtime would have to be given.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_ray.data.schema import IMAGE_SHAPE, NUM_CLASSES
from mnist_ray.errors import InputError

INPUT_NAME, OUTPUT_NAME = "pixels", "probs"
# Operator sets of standard ONNX ("" is ai.onnx) and its traditional-ML set, which tf2onnx declares.
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
GPU_RUNTIME_MISSING = (
    "--use-gpu needs onnxruntime's CUDA execution provider, which this Python does not have: "
    "install onnxruntime-gpu in place of onnxruntime (pip uninstall -y onnxruntime && "
    "pip install 'onnxruntime-gpu>=1.31,<1.33'; both provide the module onnxruntime)"
)


class ModelFileError(InputError):
    """An ONNX file that is not a model this code scores with."""


@dataclass(frozen=True)
class OnnxModel:
    """The bytes of a checked ``model.onnx`` and what identifies them."""

    data: bytes
    sha256: str


def check_onnx(data: bytes, source: str) -> OnnxModel:
    """Refuse (``ModelFileError``) anything but a parseable ONNX model with the contract's signature
    and standard operators only; ``source`` names the file in messages."""
    import onnx

    try:
        proto = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX model, whatever the cause
        raise ModelFileError(f"{source}: not an ONNX model ({type(exc).__name__})") from None
    custom = sorted({o.domain for o in proto.opset_import} - set(STANDARD_DOMAINS))
    custom += sorted({n.domain for n in proto.graph.node} - set(STANDARD_DOMAINS) - set(custom))
    if custom:
        raise ModelFileError(
            f"{source}: uses operators of the custom domain(s) {', '.join(map(repr, custom))}; only standard "
            "ONNX operators are accepted (a custom operator is code the runtime would have to load)"
        )
    signature = _signature(proto)
    expected = {"inputs": [(INPUT_NAME, "uint8", ["n", *IMAGE_SHAPE])],
                "outputs": [(OUTPUT_NAME, "float32", ["n", NUM_CLASSES])]}
    if signature != expected:
        raise ModelFileError(
            f"{source}: takes {_show(signature['inputs'])} and returns {_show(signature['outputs'])}; "
            f"expected {_show(expected['inputs'])} → {_show(expected['outputs'])}"
        )
    return OnnxModel(data, hashlib.sha256(data).hexdigest())


def _signature(proto) -> dict[str, list]:
    import onnx

    def describe(values) -> list:
        found = []
        for value in values:
            tensor = value.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else "n" for d in tensor.shape.dim]
            found.append((value.name, onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, dims))
        return found

    initialisers = {t.name for t in proto.graph.initializer}
    return {"inputs": describe(v for v in proto.graph.input if v.name not in initialisers),
            "outputs": describe(proto.graph.output)}


def _show(values: list) -> str:
    shown = [f"{name} {dtype} ({', '.join(map(str, dims))})" for name, dtype, dims in values]
    return ", ".join(shown) or "nothing"


def session(data: bytes, *, threads: int | None, use_gpu: bool = False):
    """An onnxruntime session over checked model bytes.

    ``threads``: onnxruntime's intra-op threads (the CPUs Ray reserved for this actor;
    None: one per core). With ``use_gpu``, the CUDA execution provider, or ``InputError``
    if this onnxruntime has none.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One operator at a time, each using every thread: this graph is a chain, nothing runs beside it.
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = threads
    # Threads spin-wait between calls by default: in an actor that shares its node, that is stolen CPU.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: onnxruntime's warnings are not the user's business
    providers = [CPU]
    if use_gpu:
        if CUDA not in ort.get_available_providers():
            raise InputError(GPU_RUNTIME_MISSING)
        providers = [CUDA, CPU]
    return ort.InferenceSession(data, sess_options=options, providers=providers)


def predict(session, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Probabilities float32 (n, 10) of uint8 images (n, 28, 28), ``batch_size`` images per call."""
    if not len(images):
        return np.zeros((0, NUM_CLASSES), np.float32)
    return np.concatenate([
        session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images[i:i + batch_size])})[0]
        for i in range(0, len(images), batch_size)
    ])


def read_run_model(run_dir: Path, metadata: dict, *, int8: bool = False, version: str | None = None
                   ) -> OnnxModel:
    """A run's model.onnx, or with ``int8`` its int8 copy (model.int8.onnx, which must be the file
    ``metadata`` records; one line says what it costs in accuracy), checked. ``version``: the
    registry version these files are (None: a run directory). ``ModelFileError`` names what is
    missing or wrong."""
    from mnist_ray import artifacts

    if not int8:
        return read_checked(run_dir / artifacts.ONNX_FILE)
    path, record = run_dir / artifacts.ONNX_INT8_FILE, metadata.get("onnx_int8")
    if not path.is_file() or not isinstance(record, dict):
        if version is not None:
            raise ModelFileError(f"--int8: {version} has no int8 copy (it was registered before runs had "
                                 "one): score or serve it without --int8, or promote a run trained since")
        problem = "does not exist" if not path.is_file() else "is not recorded in metadata.json"
        raise ModelFileError(
            f"--int8: {path} {problem}; write it (with model.onnx): python jobs/export_onnx.py {run_dir}")
    model = read_checked(path)
    if model.sha256 != record.get("sha256"):
        raise ModelFileError(f"--int8: {path} is not the file metadata.json records (sha256 "
                             f"{model.sha256[:12]}, recorded {str(record.get('sha256'))[:12]})")
    print(f"int8: {describe_int8(record)}", flush=True)
    return model


def describe_int8(record: dict) -> str:
    """One line on an int8 copy (what metadata.json records of it): its test accuracy beside the
    float model's."""
    return (f"{record['file']}: test accuracy {record['accuracy_int8']:.2%} (float model "
            f"{record['accuracy_float']:.2%}), the same class for {record['argmax_agreement']:.2%} of "
            f"{record['evaluated_on']:,} test images")


def read_checked(path: str | os.PathLike) -> OnnxModel:
    """The ONNX model in the file ``path``, checked (:func:`check_onnx`)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return check_onnx(data, str(path))
