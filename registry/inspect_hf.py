"""The validation child's check of an hf_causal_lm archive: load it, generate one token.

Called by `registry/inspect_child.py` in the sandboxed child, after the archive inspector
passed the files (`swarm_protocol/archive_hf.py`). The signature is the text one every
causal LM serves (text_input -> text_output, BYTES); the metadata (context length,
vocabulary size, parameter count, dtype) comes from the files. No Django.
"""

from __future__ import annotations

from typing import Any

from swarm_protocol.archive import InspectedArchive
from swarm_protocol.archive_hf import TEXT_SIGNATURE
from swarm_protocol.signature import Signature, parse_signature

SAMPLE_PROMPT = "Hello"


class HfRefusal(Exception):
    """The model is not acceptable; the message is shown to the uploader."""


def inspect_hf_model(archive: InspectedArchive, declared: Signature | None
                     ) -> tuple[Signature, list[dict[str, Any]], dict[str, Any]]:
    """Return (signature, observed outputs, info) after loading and one generated token."""
    assert archive.hf is not None
    signature = parse_signature(TEXT_SIGNATURE)
    if declared is not None and declared.to_dict() != signature.to_dict():
        raise HfRefusal("an hf_causal_lm model serves text_input -> text_output (BYTES, "
                        "[-1, 1]); leave the signature out")
    model, tokenizer = _load(archive)
    token = _one_token(model, tokenizer)
    vocab_size = archive.hf.vocab_size
    if vocab_size and len(tokenizer) > vocab_size:
        raise HfRefusal(f"the tokenizer has {len(tokenizer)} tokens, more than the model's "
                        f"vocabulary of {vocab_size}")
    info = {**archive.hf.metadata(), "sample_token": token}
    outputs = [{"name": "text_output", "datatype": "BYTES", "shape": [1, 1]}]
    return signature, outputs, info


def _load(archive: InspectedArchive) -> tuple[Any, Any]:
    import torch

    from swarm_protocol.model_loading import load_causal_lm

    torch.set_num_threads(1)
    try:
        return load_causal_lm(archive, "cpu")
    except Exception as exc:
        raise HfRefusal(f"the hf_causal_lm archive could not be loaded: "
                        f"{_first_line(exc)}") from None


def _one_token(model: Any, tokenizer: Any) -> str:
    import torch

    try:
        ids = tokenizer(SAMPLE_PROMPT, return_tensors="pt").input_ids
        with torch.inference_mode():
            logits = model(input_ids=ids).logits
        token = int(logits[0, -1].argmax())
    except Exception as exc:
        raise HfRefusal(f"generating one token failed: {_first_line(exc)}") from None
    if not 0 <= token < logits.shape[-1]:
        raise HfRefusal("the model produced a token outside its vocabulary")
    return str(tokenizer.decode([token]))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]
