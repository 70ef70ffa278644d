"""The HTTP API's contract: what ``POST /predict`` accepts, what it answers, and the errors it gives.

Pure functions on bytes, lists and arrays (no Ray, no onnxruntime), so that every rule is
tested without a server. The rules are the CSV reader's (:mod:`mnist_ray.data.csv_rules`):
pixels are integers 0–255 and nothing is coerced (``7.0``, ``"7"`` and ``true`` are not
pixels). A bad value is a 400 that names the image (0-based, in request order), the pixel
and the value; a body or an image count past the limits is a 413. Bad input never reaches
the model, so it can never be a 500.

Request: ``{"images": [image, ...]}``, each image 784 integers (row-major, as a Kaggle CSV
row) or 28 lists of 28. Response: ``{"model_version": str, "predictions": [{"label": int,
"confidence": float, "probabilities": [10 floats]}, ...]}``, one per image, in order.
Errors: ``{"error": str}``.
"""

from __future__ import annotations

import json

import numpy as np

from mnist_ray.data.schema import IMAGE_SHAPE, IMAGE_SIDE, NUM_PIXELS, PIXEL_MAX, PIXEL_MIN

# A page sends one image and an application a few; 256 keeps one request's inference (a few
# ms for the CNN) from delaying the requests batched with it.
MAX_IMAGES = 256
# 256 images as pretty-printed JSON (one value per line, indented) take ~2.6 MB; compact JSON
# ~0.9 MB. Anything larger is not a request this API can answer.
MAX_BODY_BYTES = 4 << 20
PROBABILITY_DECIMALS = 6
_SHOWN_CHARS = 40
SHAPES = "784 integers or 28 lists of 28"


class RequestError(Exception):
    """A request the API refuses: ``status`` (400, 404, 405, 413) and a message naming what is wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_predict_body(body: bytes) -> np.ndarray:
    """The images of a ``POST /predict`` body as uint8 (n, 28, 28), 1 ≤ n ≤ MAX_IMAGES.

    Raises ``RequestError`` (400 or 413) naming what is wrong: the first bad image and
    value, not a list of every problem (a client fixes one and sends again).
    """
    if len(body) > MAX_BODY_BYTES:
        raise body_too_large(len(body))
    try:
        payload = json.loads(body)
    except UnicodeDecodeError:
        raise RequestError(400, "the body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise RequestError(400, f"the body is not JSON: {exc.msg} ({where})") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of over 4,300 digits, nesting too deep
        raise RequestError(400, f"the body is not JSON this API reads: {str(exc)[:200]}") from None
    if not isinstance(payload, dict):
        raise RequestError(400, f'expected a JSON object {{"images": [...]}}, got {_json_type(payload)}')
    unknown = sorted(set(payload) - {"images"})
    if unknown:
        raise RequestError(400, f"unknown key(s) {', '.join(map(repr, unknown))}: the only key is 'images'")
    if "images" not in payload:
        raise RequestError(400, 'missing key \'images\': expected {"images": [image, ...]}')
    images = payload["images"]
    if not isinstance(images, list):
        raise RequestError(400, f"'images' must be a list of images, got {_json_type(images)}")
    if not images:
        raise RequestError(400, "'images' is empty: send at least one image")
    if len(images) > MAX_IMAGES:
        raise RequestError(413, f"{len(images):,} images in one request; at most {MAX_IMAGES} are accepted")
    return np.stack([check_image(index, image) for index, image in enumerate(images)])


def body_too_large(size: int | None) -> RequestError:
    """The 413 for a body of ``size`` bytes (None: unknown, the stream passed the limit)."""
    found = f"{size:,} bytes" if size is not None else "more than that"
    return RequestError(413, f"the body is larger than {MAX_BODY_BYTES:,} bytes ({found})")


def check_image(index: int, image: object) -> np.ndarray:
    """One image of a request as uint8 (28, 28), or ``RequestError`` (400) naming ``index``, pixel, value."""
    if not isinstance(image, list):
        raise RequestError(400, f"image {index}: expected {SHAPES}, got {_json_type(image)}")
    if len(image) == NUM_PIXELS:
        flat = image
    elif len(image) == IMAGE_SIDE and all(isinstance(row, list) for row in image):
        lengths = [len(row) for row in image]
        if lengths != [IMAGE_SIDE] * IMAGE_SIDE:
            row = next(i for i, n in enumerate(lengths) if n != IMAGE_SIDE)
            raise RequestError(
                400, f"image {index}, row {row}: has {lengths[row]} values; expected {IMAGE_SIDE}")
        flat = [value for row in image for value in row]
    else:
        raise RequestError(400, f"image {index}: a list of {len(image)} values; expected {SHAPES}")
    # The one loop over every pixel in Python (~40 µs per image, measured here): numpy would turn
    # true into 1, 7.5 into 7 and "7" into 7, and the rules coerce nothing.
    for k, value in enumerate(flat):
        if type(value) is not int or not PIXEL_MIN <= value <= PIXEL_MAX:
            row, column = divmod(k, IMAGE_SIDE)
            raise RequestError(
                400, f"image {index}, pixel {k} (row {row}, column {column}): {_show(value)} is not an "
                     f"integer from {PIXEL_MIN} to {PIXEL_MAX}")
    return np.array(flat, dtype=np.uint8).reshape(IMAGE_SHAPE)


def predictions(probs: np.ndarray, model_version: str) -> dict:
    """The response to a request whose images the model gave ``probs`` float32 (n, 10)."""
    labels = probs.argmax(axis=1)
    rounded = np.round(probs.astype(np.float64), PROBABILITY_DECIMALS)
    return {"model_version": model_version, "predictions": [
        {"label": int(label), "confidence": float(row[label]), "probabilities": row.tolist()}
        for label, row in zip(labels, rounded, strict=True)
    ]}


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _show(value: object) -> str:
    """The value as the client wrote it (JSON), cut short: a 400 must not echo a megabyte back."""
    text = json.dumps(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS - 3] + "..."
