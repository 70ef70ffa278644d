"""The Keras model as ONNX (``model.onnx`` beside ``model.keras``), verified against it before use.

Conversion is tf2onnx's (measured here: 0.4 s for this project's CNN, augmentation layers
included, which are inactive at inference and become no ops). The converted model is then
run with onnxruntime on real images beside the Keras model: a conversion that changes a
probability by more than MAX_PROBABILITY_DIFFERENCE, or the predicted class of an image that
Keras does not call a near tie, fails the run (seen here: at most 1.5e-7, every class the same).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mnist_ray.data.schema import IMAGE_SHAPE
from mnist_ray.errors import JobFailed
from mnist_ray.onnx_model import INPUT_NAME, check_onnx, predict, session

OPSET = 17
MAX_PROBABILITY_DIFFERENCE = 1e-4
VERIFY_BATCH = 1024


def export_onnx(model, path: Path, images: np.ndarray, *, expected: np.ndarray | None = None) -> dict:
    """Convert the Keras ``model`` into the ONNX file ``path`` and verify it on ``images``
    (uint8 (n, 28, 28)); returns what metadata.json records of it. ``expected``: the Keras
    model's probabilities of ``images``, if the caller has them. Raises ``JobFailed`` if the
    two models disagree (and then leaves no file)."""
    import tensorflow as tf
    import tf2onnx

    signature = (tf.TensorSpec((None, *IMAGE_SHAPE), tf.uint8, name=INPUT_NAME),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=OPSET)
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "n"  # tf2onnx names the batch dimension unk__N
    data = proto.SerializeToString()
    checked = check_onnx(data, str(path))
    if expected is None:
        expected = model.predict(images, batch_size=VERIFY_BATCH, verbose=0)
    agreement = verify(data, images, expected)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return {"file": path.name, "sha256": checked.sha256, "opset": OPSET, **agreement}


def verify(data: bytes, images: np.ndarray, expected: np.ndarray) -> dict:
    """Run the ONNX model ``data`` on ``images`` and compare with the Keras model's ``expected``
    probabilities; raise ``JobFailed`` unless they agree (see the module's doc)."""
    found = predict(session(data, threads=None), images, VERIFY_BATCH)
    difference = float(np.abs(found - expected).max()) if len(images) else 0.0
    top_two = np.sort(expected, axis=1)[:, -2:]
    clear = (top_two[:, 1] - top_two[:, 0]) > 2 * MAX_PROBABILITY_DIFFERENCE
    disagree = int(((found.argmax(axis=1) != expected.argmax(axis=1)) & clear).sum())
    if difference > MAX_PROBABILITY_DIFFERENCE or disagree:
        raise JobFailed(
            f"the ONNX export disagrees with the Keras model on {len(images):,} images: probabilities "
            f"differ by up to {difference:.2e} (allowed {MAX_PROBABILITY_DIFFERENCE:.0e}), {disagree} "
            "predicted class(es) differ; model.onnx was not written"
        )
    agreement = float((found.argmax(axis=1) == expected.argmax(axis=1)).mean()) if len(images) else 1.0
    return {"verified_on": len(images), "max_abs_difference": difference, "argmax_agreement": agreement}


def export_run(path: str) -> dict:
    """``jobs/export_onnx.py``: write what a finished run trained before runs had them lacks:
    ``model.onnx`` and its int8 copy, ``model.int8.onnx``.

    A ``model.onnx`` that metadata.json records (its sha256) is kept: converting again would give
    another file, so another model id, and every input it scored would be scored again. Otherwise
    the model is loaded in safe mode (a file that carries code is refused, and its code does not
    run), converted and verified on the bundled MNIST test images. Returns what metadata.json now
    records of ``model.onnx``.
    """
    import hashlib

    from mnist_ray import artifacts
    from mnist_ray.data.sources import BUNDLED_MNIST, load_npz
    from mnist_ray.train.quantize import write_int8_copy

    run_dir = artifacts.resolve_run_dir(path)
    metadata = artifacts.check_scoring_run(run_dir, require_onnx=False)
    mnist = load_npz(BUNDLED_MNIST)
    images, onnx_path = mnist["x_test"], run_dir / artifacts.ONNX_FILE
    onnx = metadata.get("onnx") if isinstance(metadata.get("onnx"), dict) else None
    found = hashlib.sha256(onnx_path.read_bytes()).hexdigest() if onnx_path.is_file() else None
    if onnx and found == onnx.get("sha256"):
        print(f"{onnx_path}: kept, the file metadata.json records (sha256 {onnx['sha256'][:12]})", flush=True)
    else:
        onnx = export_onnx(artifacts.load_model(run_dir), onnx_path, images)
        print(f"{onnx_path}: verified on {onnx['verified_on']:,} MNIST test images (probabilities within "
              f"{onnx['max_abs_difference']:.1e} of Keras's, the same class for "
              f"{onnx['argmax_agreement']:.2%}); sha256 {onnx['sha256'][:12]}", flush=True)
    int8 = write_int8_copy(run_dir, images, mnist["y_test"])
    artifacts.write_json(run_dir / artifacts.METADATA_FILE, metadata | {"onnx": onnx}
                         | ({"onnx_int8": int8} if int8 else {}))
    return onnx
