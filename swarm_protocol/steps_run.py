"""Run a version's steps (swarm_protocol/steps.py) on numpy arrays: images in, labels out.

Pure apart from Pillow: image bytes become the model's input tensor (decode, color mode,
resize, layout, scale, mean/std) and a model output becomes top-k scores, class indices
and labels. A request's bad data raises StepError with a message for the client (400).
The replica runs these around its model (serving/replica/pipeline.py); the upload's
validation child runs them once on generated pictures (`dry_run`), so both run one code,
which lives here because serving depends on registry and not the other way round.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterable
from functools import partial

import numpy as np
from PIL import Image

from swarm_protocol.steps import ClassifyStep, ImageStep, Steps

IMAGE_FORMATS = ("JPEG", "PNG")
MAX_IMAGE_PIXELS = 4096 * 4096  # decoded size; checked from the header before decoding
# Small pictures resized to the model's size can grow a lot: a request's decoded batch is
# bounded (the body limit alone would let a million tiny PNGs become gigabytes).
MAX_DECODED_BYTES = 512 * 1024 * 1024
_IMAGE_DTYPES = {"UINT8": np.uint8, "FP16": np.float16, "FP32": np.float32,
                 "FP64": np.float64}


class StepError(ValueError):
    """Input data that a step cannot take (HTTP 400); the message names the input."""


def decode_images(array: np.ndarray, step: ImageStep,
                  map_rows: Callable[..., Iterable[np.ndarray]] = map) -> np.ndarray:
    """Return BYTES [N, 1] (one JPEG or PNG per row) as the model input [N, C, H, W] or
    [N, H, W, C] of the step's datatype; raises StepError naming the input and row.

    `map_rows`: how rows are decoded, e.g. a thread pool's map (Pillow releases the GIL
    while it decodes and resizes)."""
    if array.ndim != 2 or array.shape[1] != 1:
        raise StepError(f"input {step.name!r} must have shape [N, 1]: one image per row")
    channels = 1 if step.color == "L" else 3
    row_bytes = step.height * step.width * channels * 4  # float32 while normalising
    if len(array) * row_bytes > MAX_DECODED_BYTES:
        raise StepError(f"input {step.name!r}: {len(array)} images would take "
                        f"{len(array) * row_bytes} bytes decoded; send at most "
                        f"{MAX_DECODED_BYTES // row_bytes} per request")
    rows = list(map_rows(partial(_image_row, step=step), array[:, 0], range(len(array))))
    batch = np.stack(rows).astype(np.float32)  # [N, H, W, C]
    if step.datatype != "UINT8":
        mean = np.asarray(step.mean, dtype=np.float32)
        std = np.asarray(step.std, dtype=np.float32)
        batch = (batch * np.float32(step.scale) - mean) / std
    if step.layout == "CHW":
        batch = batch.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(batch, dtype=_IMAGE_DTYPES[step.datatype])


def _image_row(data: bytes, row: int, step: ImageStep) -> np.ndarray:
    """Return one image as [H, W, C] uint8, resized to the step's size."""
    where = f"input {step.name!r} row {row}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = opened.size
            if width * height > MAX_IMAGE_PIXELS:
                raise StepError(f"{where}: the image is {width}x{height} pixels, more than "
                                f"{MAX_IMAGE_PIXELS} (4096x4096) are refused")
            if opened.format == "JPEG":  # decodes at 1/2, 1/4 or 1/8 scale: less to resize
                opened.draft("L" if step.color == "L" else "RGB", (step.width, step.height))
            image = opened.convert("L" if step.color == "L" else "RGB")
            image = image.resize((step.width, step.height), Image.Resampling.BILINEAR)
    except StepError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise StepError(f"{where}: the image is too large to decode ({exc})") from None
    except Exception as exc:  # Pillow raises many kinds for corrupt data
        raise StepError(f"{where} is not a readable JPEG or PNG image "
                        f"({type(exc).__name__}: {_first_line(exc)})") from None
    pixels = np.asarray(image, dtype=np.uint8)
    if step.color == "L":
        return pixels[:, :, np.newaxis]
    return pixels[:, :, ::-1] if step.color == "BGR" else pixels


def label_table(labels: tuple[str, ...]) -> np.ndarray:
    """Return the labels as a BYTES array (UTF-8), indexed by class."""
    table = np.empty(len(labels), dtype=object)
    table[:] = [label.encode() for label in labels]
    return table


def classify(output: np.ndarray, step: ClassifyStep, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Return the step's outputs for a float model output [N, classes]: top-k scores [N, k]
    (softmax first if asked), and indices (INT64) and labels (BYTES, from `label_table`)
    when named. RuntimeError when the classes are fewer than k or not one per label."""
    if step.labels and output.shape[1] != len(labels):
        raise RuntimeError(f"output {step.output!r} has {output.shape[1]} classes but the "
                           f"labels file has {len(labels)} labels")
    scores = output.astype(np.float32)
    if step.softmax:
        shifted = scores - scores.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        scores = exp / exp.sum(axis=1, keepdims=True)
    k = step.top_k
    if scores.shape[1] < k:
        raise RuntimeError(f"output {step.output!r} has {scores.shape[1]} classes, fewer than "
                           f"top_k {k}")
    # argpartition finds the top k in O(classes); only those k are then sorted.
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    indices = np.take_along_axis(top, order, axis=1).astype(np.int64)
    result: dict[str, np.ndarray] = {step.scores: np.take_along_axis(scores, indices, axis=1)}
    if step.indices:
        result[step.indices] = indices
    if step.labels:
        result[step.labels] = labels[indices]
    return result


def dry_run(steps: Steps, classes: dict[str, int] | None = None) -> None:
    """Run every step once: a generated 2x3 PNG and JPEG through each image step, and a
    one-row output through each classify step (`classes`: the model output's observed
    width, by output name); raise StepError naming what failed."""
    for step in steps.inputs:
        decoded = decode_images(sample_pictures(), step)
        if step.layout == "CHW":
            expected = (2, decoded.shape[1], step.height, step.width)
        else:
            expected = (2, step.height, step.width, decoded.shape[3])
        if decoded.shape != expected:
            raise StepError(f"the image step for {step.input!r} made {list(decoded.shape)}, "
                            f"not {list(expected)}")
    labels = label_table(steps.labels)
    for classify_step in steps.outputs:
        width = (classes or {}).get(classify_step.output) or \
            (len(steps.labels) if classify_step.labels else classify_step.top_k)
        try:
            classify(np.zeros((1, width), dtype=np.float32), classify_step, labels)
        except RuntimeError as exc:
            raise StepError(str(exc)) from None


def sample_pictures(rows: int = 2) -> np.ndarray:
    """Return BYTES [rows, 1] of small generated pictures, PNG and JPEG in turn."""
    pictures = np.empty((rows, 1), dtype=object)
    pictures[:, 0] = [_picture(IMAGE_FORMATS[row % len(IMAGE_FORMATS)]) for row in range(rows)]
    return pictures


def _picture(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (3, 2), (200, 100, 50)).save(buffer, format=fmt)
    return buffer.getvalue()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
