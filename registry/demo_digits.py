"""The image demo: a handwritten-digit classifier trained by our own code, served as ONNX.

`make run` trains it at first start (about a second on a CPU) on the 8x8 digits that
scikit-learn ships (`sklearn.datasets.load_digits`, 1797 pictures, ink 0..16 on a 0
background), writes the learned weights into an ONNX graph with the `onnx.helper` API
(no exporter), and registers it with processing steps, so clients send a PNG or JPEG and
get labels back.

The split of work between the steps and the graph:
- steps (swarm_protocol/steps.py): decode PNG/JPEG, grayscale ("L"), resize to 8x8 (Pillow's
  bilinear filter widens with the shrink, so it averages like the dataset's 4x4 blocks),
  scale 1/255: the model input `pixels` is FP32 [-1, 1, 8, 8] in 0..1, as the dataset
  divided by its 16 (which is what the classifier is trained on);
- graph: polarity, then the classifier. Steps cannot invert (scale and std are positive)
  and people draw digits dark on light as often as light on dark, so the graph inverts a
  picture whose mean brightness is over one half (a digit covers well under half of its
  box), then applies the multinomial logistic regression: `logits` FP32 [-1, 10];
- steps again: softmax, top 3, the labels "0".."9" as BYTES.
"""

from __future__ import annotations

import argparse
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DIGITS_MODEL_NAME = "demo-digits"
DIGITS_SIDE = 8
DIGITS_CLASSES = 10
DIGITS_INK_MAX = 16.0  # the dataset's scale: ink pixels counted in 4x4 blocks of 32x32
DIGITS_SEED = 0
DIGITS_HELD_OUT_FRACTION = 0.25
DIGITS_TOP_K = 3
LIGHT_BACKGROUND_MEAN = 0.5  # a mean brightness over this is dark ink on a light background
OPSET = 17  # ReduceMean takes its axes as an attribute up to 17
PRODUCER = ("swarm-portal.demo_digits", "1.0")

DIGITS_SIGNATURE: dict[str, Any] = {
    "inputs": [{"name": "pixels", "datatype": "FP32",
                "shape": [-1, 1, DIGITS_SIDE, DIGITS_SIDE]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, DIGITS_CLASSES]}],
}
# Without "labels": they come from the labels file, as an upload's would.
DIGITS_STEPS: dict[str, Any] = {
    "inputs": [{"input": "pixels", "name": "image", "decode": "image", "color": "L",
                "layout": "CHW", "scale": 1 / 255}],
    "outputs": [{"output": "logits", "softmax": True, "top_k": DIGITS_TOP_K,
                 "scores": "scores", "indices": "digits", "labels": "labels"}],
}
DIGITS_LABELS = [str(digit) for digit in range(DIGITS_CLASSES)]
DIGITS_LABELS_FILE = "".join(f"{label}\n" for label in DIGITS_LABELS).encode()


@dataclass(frozen=True)
class DigitsSplit:
    """The dataset split once, the same way each time: images [N, 8, 8] in 0..16."""

    train_images: np.ndarray
    train_labels: np.ndarray
    held_out_images: np.ndarray
    held_out_labels: np.ndarray


@dataclass(frozen=True)
class TrainedDigits:
    """Learned weights (coef [10, 64], intercept [10]) and the held-out accuracy (0..1)."""

    coef: np.ndarray
    intercept: np.ndarray
    held_out_accuracy: float
    train_rows: int
    held_out_rows: int

    def metadata(self) -> dict[str, Any]:
        """Return what the registered version records about its training."""
        return {"source": "registry.demo_digits.train", "dataset": "sklearn.datasets.load_digits",
                "classifier": "sklearn LogisticRegression (multinomial, lbfgs)",
                "seed": DIGITS_SEED, "train_rows": self.train_rows,
                "held_out_rows": self.held_out_rows,
                "held_out_accuracy": round(self.held_out_accuracy, 4),
                "input": "PNG or JPEG, light on dark or dark on light; resized to 8x8"}


def split_digits() -> DigitsSplit:
    """Return the bundled digits split into training and held-out rows (stratified, seeded)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    train_x, held_x, train_y, held_y = train_test_split(
        digits.images, digits.target, test_size=DIGITS_HELD_OUT_FRACTION,
        random_state=DIGITS_SEED, stratify=digits.target)
    return DigitsSplit(train_x, train_y, held_x, held_y)


def train(split: DigitsSplit | None = None) -> TrainedDigits:
    """Fit the classifier on the training rows; score it on the held-out rows."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    split = split or split_digits()
    classifier = LogisticRegression(C=3.0, max_iter=1000)  # lbfgs: no randomness
    # One BLAS thread: the same floating-point sums (so the same bytes) on every machine,
    # and no threads spinning against a busy CPU (two threads took minutes under load).
    with threadpool_limits(limits=1):
        classifier.fit(_rows(split.train_images), split.train_labels)
    accuracy = float(classifier.score(_rows(split.held_out_images), split.held_out_labels))
    return TrainedDigits(coef=classifier.coef_.astype(np.float32),
                         intercept=classifier.intercept_.astype(np.float32),
                         held_out_accuracy=accuracy, train_rows=len(split.train_labels),
                         held_out_rows=len(split.held_out_labels))


def _rows(images: np.ndarray) -> np.ndarray:
    """Return images [N, 8, 8] in 0..16 as features [N, 64] in 0..1 (the model's input)."""
    return images.reshape(len(images), DIGITS_SIDE * DIGITS_SIDE) / DIGITS_INK_MAX


def onnx_model(trained: TrainedDigits) -> Any:
    """Return the ModelProto: pixels [batch, 1, 8, 8] in 0..1 -> logits [batch, 10]."""
    from onnx import TensorProto, helper, numpy_helper

    constants = {"one": np.float32(1.0), "half": np.float32(LIGHT_BACKGROUND_MEAN),
                 "coef": trained.coef,
                 "intercept": trained.intercept}
    nodes = [
        helper.make_node("ReduceMean", ["pixels"], ["brightness"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Greater", ["brightness", "half"], ["light_background"]),
        helper.make_node("Sub", ["one", "pixels"], ["inverted"]),
        helper.make_node("Where", ["light_background", "inverted", "pixels"], ["ink"]),
        helper.make_node("Flatten", ["ink"], ["features"], axis=1),
        helper.make_node("Gemm", ["features", "coef", "intercept"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "demo_digits",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT,
                                       ["batch", 1, DIGITS_SIDE, DIGITS_SIDE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", DIGITS_CLASSES])],
        [numpy_helper.from_array(np.asarray(value), name) for name, value in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name=PRODUCER[0], producer_version=PRODUCER[1])
    model.ir_version = 8  # what onnxruntime of these years reads
    return model


def save_onnx(path: Path, trained: TrainedDigits | None = None) -> TrainedDigits:
    """Train (unless given weights) and write the ONNX file; return what was trained."""
    from onnx import save_model

    trained = trained or train()
    save_model(onnx_model(trained), str(path))
    return trained


def sample_png(index: int = 0, side: int = 64) -> tuple[bytes, int]:
    """Return held-out digit `index` as a dark-on-light grayscale PNG (side x side pixels)
    and its label; IndexError past the 450 held-out digits."""
    from PIL import Image

    split = split_digits()
    ink = np.rint(split.held_out_images[index] * 255 / DIGITS_INK_MAX).astype(np.uint8)
    picture = Image.fromarray(255 - ink, "L").resize((side, side), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue(), int(split.held_out_labels[index])


def main(argv: list[str] | None = None) -> None:
    """Write a held-out digit as a PNG to try demo-digits with (the README's example)."""
    parser = argparse.ArgumentParser(prog="python -m registry.demo_digits",
                                     description=main.__doc__)
    parser.add_argument("path", type=Path)
    parser.add_argument("--index", type=int, default=0, help="held-out digit, 0 to 449")
    parser.add_argument("--side", type=int, default=64, help="width and height in pixels")
    args = parser.parse_args(argv)
    png, label = sample_png(args.index, args.side)
    args.path.write_bytes(png)
    print(f"wrote {args.path}: held-out digit {args.index}, a {label}")


if __name__ == "__main__":
    main()
