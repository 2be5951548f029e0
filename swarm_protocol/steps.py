"""A version's processing steps, validated against its model signature (pure: stdlib only).

The model's signature is the tensor side; steps turn what clients send into those tensors
and the model's outputs into what clients get back, so a version *serves* another
signature (`served_signature`). Shape of the configuration:

    {"inputs": [{"input": "image", "name": "image_bytes", "decode": "image",
                 "color": "RGB", "layout": "CHW", "scale": 0.0039215686,
                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}],
     "outputs": [{"output": "logits", "softmax": true, "top_k": 5,
                  "scores": "scores", "labels": "labels", "indices": "class_ids"}],
     "labels": ["cat", "dog", ...]}

An input step takes one JPEG or PNG per row (BYTES [-1, 1]) and resizes it to the model
input's fixed height and width ([-1, C, H, W] for CHW, [-1, H, W, C] for HWC; C is 3 for
RGB and BGR, 1 for L). An output step takes a model output [-1, classes] and returns the
top k scores (FP32), and optionally their class indices (INT64) and labels (BYTES), each
[-1, k]. `labels` comes from the labels file uploaded with the version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from swarm_protocol.signature import (
    Signature,
    SignatureError,
    TensorSpec,
    parse_tensor_spec,
)

COLORS = {"RGB": 3, "BGR": 3, "L": 1}
LAYOUTS = ("CHW", "HWC")
IMAGE_DATATYPES = ("UINT8", "FP16", "FP32", "FP64")
SCORE_DATATYPES = ("FP16", "BF16", "FP32", "FP64")
MAX_IMAGE_SIDE = 4096  # model inputs larger than this are not images we resize to
MAX_LABELS = 100_000
MAX_LABEL_CHARS = 256
MAX_LABELS_FILE_BYTES = 4 * 1024 * 1024
_INPUT_KEYS = {"input", "name", "decode", "color", "layout", "scale", "mean", "std"}
_OUTPUT_KEYS = {"output", "softmax", "top_k", "scores", "labels", "indices"}


class StepsError(ValueError):
    """A steps configuration that does not fit; the message says which part and why."""


@dataclass(frozen=True)
class ImageStep:
    """Decode one JPEG/PNG per row into the model input `input` (served as `name`)."""

    input: str
    name: str
    color: str
    layout: str
    height: int
    width: int
    datatype: str
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class ClassifyStep:
    """Turn the model output `output` [-1, classes] into top-k scores, indices and labels."""

    output: str
    softmax: bool
    top_k: int
    scores: str
    labels: str | None
    indices: str | None


@dataclass(frozen=True)
class Steps:
    """A version's steps, in the order of the tensors they replace."""

    inputs: tuple[ImageStep, ...]
    outputs: tuple[ClassifyStep, ...]
    labels: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """Return the configuration as stored (and as `parse_steps` reads it back)."""
        return {
            "inputs": [{"input": s.input, "name": s.name, "decode": "image", "color": s.color,
                        "layout": s.layout, "scale": s.scale, "mean": list(s.mean),
                        "std": list(s.std)} for s in self.inputs],
            "outputs": [{"output": s.output, "softmax": s.softmax, "top_k": s.top_k,
                         "scores": s.scores, "labels": s.labels, "indices": s.indices}
                        for s in self.outputs],
            "labels": list(self.labels),
        }


def parse_labels_file(data: bytes) -> list[str]:
    """Return the labels of a UTF-8 text file, one per line (blank lines at the end dropped)."""
    if len(data) > MAX_LABELS_FILE_BYTES:
        raise StepsError(f"the labels file is larger than {MAX_LABELS_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise StepsError("the labels file must be UTF-8 text, one label per line") from None
    return [line.strip() for line in text.rstrip("\r\n").splitlines()]


def parse_steps(raw: Any, signature: Signature) -> Steps:
    """Return the steps of `raw` checked against the model `signature`, or raise StepsError."""
    if not isinstance(raw, dict):
        raise StepsError("steps must be an object with inputs, outputs and labels")
    _refuse_unknown(raw, {"inputs", "outputs", "labels"}, "steps")
    labels = _labels(raw.get("labels", []))
    inputs = tuple(_image_step(item, f"steps.inputs[{i}]", signature)
                   for i, item in enumerate(_list(raw.get("inputs", []), "steps.inputs")))
    outputs = tuple(_classify_step(item, f"steps.outputs[{i}]", signature, labels)
                    for i, item in enumerate(_list(raw.get("outputs", []), "steps.outputs")))
    if not inputs and not outputs:
        raise StepsError("steps must hold at least one input or output step")
    if labels and not any(step.labels for step in outputs):
        raise StepsError("a labels file was given but no output step names a labels output")
    steps = Steps(inputs=inputs, outputs=outputs, labels=labels)
    _unique([s.input for s in inputs], "steps.inputs: a model input has two steps")
    _unique([s.output for s in outputs], "steps.outputs: a model output has two steps")
    served_signature(steps, signature)  # names must stay unique on the served side
    return steps


def served_signature(steps: Steps | None, signature: Signature) -> Signature:
    """Return the signature clients see: stepped tensors replaced by what the steps take
    (BYTES [-1, 1]) and give back ([-1, k] each); raises StepsError on clashing names."""
    if steps is None:
        return signature
    by_input = {step.input: step for step in steps.inputs}
    by_output = {step.output: step for step in steps.outputs}
    inputs = tuple(TensorSpec(by_input[s.name].name, "BYTES", (-1, 1)) if s.name in by_input
                   else s for s in signature.inputs)
    outputs: list[TensorSpec] = []
    for spec in signature.outputs:
        step = by_output.get(spec.name)
        outputs.extend(_classify_outputs(step) if step else (spec,))
    _unique([s.name for s in inputs], "steps: two served inputs would share a name")
    _unique([s.name for s in outputs], "steps: two served outputs would share a name")
    return Signature(inputs=inputs, outputs=tuple(outputs))


def _classify_outputs(step: ClassifyStep) -> list[TensorSpec]:
    shape = (-1, step.top_k)
    specs = [TensorSpec(step.scores, "FP32", shape)]
    if step.indices:
        specs.append(TensorSpec(step.indices, "INT64", shape))
    if step.labels:
        specs.append(TensorSpec(step.labels, "BYTES", shape))
    return specs


def _image_step(raw: Any, where: str, signature: Signature) -> ImageStep:
    item = _object(raw, where, _INPUT_KEYS)
    spec = _find(signature.inputs, item.get("input"), f"{where}.input", "input")
    if item.get("decode", "image") != "image":
        raise StepsError(f"{where}.decode must be \"image\" (JPEG or PNG)")
    color = _choice(item.get("color", "RGB"), COLORS, f"{where}.color")
    layout = _choice(item.get("layout", "CHW"), LAYOUTS, f"{where}.layout")
    height, width = _image_size(spec, COLORS[color], layout, where)
    if spec.datatype not in IMAGE_DATATYPES:
        raise StepsError(f"{where}: model input {spec.name!r} is {spec.datatype}; an image "
                         f"step feeds {', '.join(IMAGE_DATATYPES)}")
    scale = _number(item.get("scale", 1.0), f"{where}.scale", positive=True)
    mean = _per_channel(item.get("mean"), COLORS[color], 0.0, f"{where}.mean")
    std = _per_channel(item.get("std"), COLORS[color], 1.0, f"{where}.std", positive=True)
    if spec.datatype == "UINT8" and (scale != 1.0 or any(mean) or any(s != 1.0 for s in std)):
        raise StepsError(f"{where}: model input {spec.name!r} is UINT8, so scale, mean and "
                         "std cannot apply (they make fractions)")
    return ImageStep(input=spec.name, name=_name(item.get("name", spec.name), f"{where}.name"),
                     color=color, layout=layout, height=height, width=width,
                     datatype=spec.datatype, scale=scale, mean=mean, std=std)


def _image_size(spec: TensorSpec, channels: int, layout: str, where: str) -> tuple[int, int]:
    expected = "[-1, C, H, W]" if layout == "CHW" else "[-1, H, W, C]"
    if len(spec.shape) != 4 or spec.shape[0] != -1:
        raise StepsError(f"{where}: model input {spec.name!r} has shape {list(spec.shape)}; "
                         f"a {layout} image step needs {expected}")
    c, h, w = spec.shape[1:] if layout == "CHW" else (spec.shape[3], *spec.shape[1:3])
    if c != channels:
        raise StepsError(f"{where}: model input {spec.name!r} has {c} channels where "
                         f"{layout} puts them; the color mode gives {channels}")
    if not (0 < h <= MAX_IMAGE_SIDE and 0 < w <= MAX_IMAGE_SIDE):
        raise StepsError(f"{where}: model input {spec.name!r} needs a fixed height and "
                         f"width of 1 to {MAX_IMAGE_SIDE} (images are resized to them)")
    return h, w


def _classify_step(raw: Any, where: str, signature: Signature,
                   labels: tuple[str, ...]) -> ClassifyStep:
    item = _object(raw, where, _OUTPUT_KEYS)
    spec = _find(signature.outputs, item.get("output"), f"{where}.output", "output")
    if len(spec.shape) != 2 or spec.shape[0] != -1 or spec.datatype not in SCORE_DATATYPES:
        raise StepsError(f"{where}: model output {spec.name!r} is {spec.datatype} "
                         f"{list(spec.shape)}; a classify step needs a float [-1, classes]")
    classes = spec.shape[1]
    top_k = item.get("top_k", classes)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1 \
            or (classes != -1 and top_k > classes):
        raise StepsError(f"{where}.top_k must be an integer from 1 to the number of classes "
                         f"({classes if classes != -1 else 'variable'}), got {top_k!r}")
    softmax = item.get("softmax", False)
    if not isinstance(softmax, bool):
        raise StepsError(f"{where}.softmax must be true or false")
    labels_name = _optional_name(item.get("labels"), f"{where}.labels")
    if labels_name and not labels:
        raise StepsError(f"{where}.labels names an output but the version has no labels file")
    if labels_name and classes != -1 and len(labels) != classes:
        raise StepsError(f"the labels file has {len(labels)} labels but model output "
                         f"{spec.name!r} has {classes} classes")
    return ClassifyStep(output=spec.name, softmax=softmax, top_k=top_k,
                        scores=_name(item.get("scores", spec.name), f"{where}.scores"),
                        labels=labels_name,
                        indices=_optional_name(item.get("indices"), f"{where}.indices"))


def _labels(raw: Any) -> tuple[str, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_LABELS:
        raise StepsError(f"steps.labels must be a list of at most {MAX_LABELS} labels")
    for index, label in enumerate(raw):
        if not isinstance(label, str) or len(label) > MAX_LABEL_CHARS or "\x00" in label:
            raise StepsError(f"label {index + 1} must be text of at most {MAX_LABEL_CHARS} "
                             "characters")
    return tuple(raw)


def _object(raw: Any, where: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise StepsError(f"{where} must be an object")
    _refuse_unknown(raw, keys, where)
    return raw


def _refuse_unknown(raw: dict[str, Any], keys: set[str], where: str) -> None:
    unknown = set(raw) - keys
    if unknown:
        raise StepsError(f"{where} has unknown keys: {', '.join(sorted(map(str, unknown)))}")


def _list(raw: Any, where: str) -> list[Any]:
    if not isinstance(raw, list) or len(raw) > 64:
        raise StepsError(f"{where} must be a list of at most 64 steps")
    return raw


def _find(specs: tuple[TensorSpec, ...], name: Any, where: str, kind: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise StepsError(f"{where}: the model has no {kind} {name!r} (its {kind}s: "
                     f"{', '.join(spec.name for spec in specs)})")


def _choice(value: Any, allowed: Any, where: str) -> str:
    if value not in allowed:
        raise StepsError(f"{where} must be one of {', '.join(allowed)}, got {value!r}")
    return str(value)


def _number(value: Any, where: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or (positive and value <= 0):
        kind = "a positive" if positive else "a finite"
        raise StepsError(f"{where} must be {kind} number, got {value!r}")
    return float(value)


def _per_channel(value: Any, channels: int, default: float, where: str,
                 positive: bool = False) -> tuple[float, ...]:
    if value is None:
        return (default,) * channels
    if not isinstance(value, list) or len(value) != channels:
        raise StepsError(f"{where} must be a list of {channels} numbers (one per channel)")
    return tuple(_number(v, f"{where}[{i}]", positive) for i, v in enumerate(value))


def _name(value: Any, where: str) -> str:
    try:
        return parse_tensor_spec({"name": value, "datatype": "BYTES", "shape": [1]}, where).name
    except SignatureError as exc:
        raise StepsError(str(exc)) from None


def _optional_name(value: Any, where: str) -> str | None:
    return None if value is None else _name(value, where)


def _unique(names: list[str], message: str) -> None:
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise StepsError(f"{message}: {', '.join(repeated)}")
