"""A model runner with its version's steps around it, batched with the model.

`StepsRunner` looks like the runner it wraps (signature, load, forward) but serves the
version's outside signature: the engine batches requests as usual, and each batch is
decoded, run and post-processed in the model thread. A row a step cannot take fails the
batch with InputRejected; the engine then retries request by request, so only the request
that sent it gets the 400.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from serving.replica.datatypes import NUMPY_DTYPES, bf16_bits_to_float32
from serving.replica.engine import Runner
from serving.replica.runner import LoadError, ModelFailure
from swarm_protocol.steps import Steps, served_signature
from swarm_protocol.steps_run import (
    StepError,
    classify,
    decode_images,
    label_table,
    sample_pictures,
)


class InputRejected(ModelFailure):
    """A request's data that a step cannot take (HTTP 400, not a model failure)."""

DECODE_THREADS = min(4, os.cpu_count() or 1)


def with_steps(runner: Runner, steps: Steps | None) -> Runner:
    """Return the runner wrapped in the version's steps, or itself when it has none."""
    return runner if steps is None else StepsRunner(runner, steps)


class StepsRunner:
    """Runs input steps, the model, then output steps; signature: the served one."""

    def __init__(self, runner: Runner, steps: Steps) -> None:
        self.runner = runner
        self.steps = steps
        self.signature = served_signature(steps, runner.signature)
        self._image_steps = {step.input: step for step in steps.inputs}
        self._classify_steps = {step.output: step for step in steps.outputs}
        self._labels = label_table(steps.labels)
        # Pictures of one batch decode side by side, each in its own thread.
        self._decoders = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")

    def load(self, warm_up_rows: int) -> None:
        """Load and warm up the wrapped model, then run generated pictures through the
        steps and the model once (raises LoadError: a version that cannot serve)."""
        self.runner.load(warm_up_rows)
        arrays = [sample_pictures(1) if spec.name in self._image_steps
                  else np.zeros(spec.concrete_shape(1), dtype=NUMPY_DTYPES[spec.datatype])
                  for spec in self.runner.signature.inputs]
        try:
            self.forward(arrays)
        except Exception as exc:  # whatever it is, this version cannot serve
            raise LoadError(f"the steps' warm-up pass failed: {exc}") from exc

    def forward(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Return the served outputs (served order) for served inputs (served order)."""
        model_inputs = []
        for array, spec in zip(arrays, self.runner.signature.inputs, strict=True):
            step = self._image_steps.get(spec.name)
            try:
                model_inputs.append(array if step is None
                                    else decode_images(array, step, self._decoders.map))
            except StepError as exc:
                raise InputRejected(str(exc)) from None
        outputs = self.runner.forward(model_inputs)
        served: list[np.ndarray] = []
        for output, spec in zip(outputs, self.runner.signature.outputs, strict=True):
            classify_step = self._classify_steps.get(spec.name)
            if classify_step is None:
                served.append(output)
                continue
            if spec.datatype == "BF16":
                output = bf16_bits_to_float32(output)
            by_name = classify(output, classify_step, self._labels)
            served.extend(by_name[s] for s in (classify_step.scores, classify_step.indices,
                                               classify_step.labels) if s)
        return served
