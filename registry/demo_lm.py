"""The tiny generative demo model: a few-layer Llama with random weights, built here.

No model hub: the tokenizer (byte-level BPE) is trained with `tokenizers` on the text the
project ships (`demo_lm_corpus.txt`), the weights are drawn from a fixed seed, and the
Hugging Face layout (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json, chat_template.jinja) is packed as one tar archive, the upload
format of `hf_causal_lm` versions. Its answers are gibberish, but deterministic with greedy
decoding: what the tests and the benchmark exercise is the plumbing.

No Django: tests, the benchmark and the demo command import it. torch, tokenizers and
transformers are imported when a model is built.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEMO_LM_NAME = "tiny-lm"
CORPUS_PATH = Path(__file__).with_name("demo_lm_corpus.txt")
END_OF_TEXT = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
ARCHIVE_MTIME = 1_700_000_000  # fixed, so the same build gives the same bytes (and sha256)
BUILD_VERSION = "1"  # bump when the recipe changes: cached archives are keyed by it


@dataclass(frozen=True)
class TinyLmShape:
    """Sizes of the demo model; the defaults give about 120 k parameters."""

    vocab_size: int = 384
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 128
    context_tokens: int = 512
    seed: int = 0


def train_tokenizer(vocab_size: int) -> Any:
    """Return a byte-level BPE `tokenizers.Tokenizer` trained on the shipped corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS_PATH.read_text().splitlines(), trainer)
    return tokenizer


def write_model_folder(folder: Path, shape: TinyLmShape = TinyLmShape()) -> Path:
    """Write the Hugging Face layout of the tiny model into `folder`; return it."""
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(shape.vocab_size), eos_token=END_OF_TEXT,
        bos_token=END_OF_TEXT, pad_token=END_OF_TEXT, model_max_length=shape.context_tokens)
    tokenizer.chat_template = CHAT_TEMPLATE
    eos_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    config = LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        max_position_embeddings=shape.context_tokens, bos_token_id=eos_id,
        eos_token_id=eos_id, pad_token_id=eos_id, tie_word_embeddings=False)
    torch.manual_seed(shape.seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, do_sample=False)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def pack_tar(folder: Path, archive_path: Path, top: str = DEMO_LM_NAME) -> Path:
    """Pack `folder`'s files under one top folder as a tar: sorted, fixed times and owner."""
    with tarfile.open(archive_path, "w", format=tarfile.PAX_FORMAT) as archive:
        for path in sorted(folder.iterdir()):
            if not path.is_file():
                continue
            data = path.read_bytes()
            info = tarfile.TarInfo(f"{top}/{path.name}")
            info.size, info.mtime, info.mode = len(data), ARCHIVE_MTIME, 0o644
            archive.addfile(info, io.BytesIO(data))
    return archive_path


def build_tiny_lm_archive(archive_path: Path, shape: TinyLmShape = TinyLmShape()) -> Path:
    """Build the tiny model and write it as a tar archive at `archive_path`; return it."""
    with tempfile.TemporaryDirectory(prefix="tiny-lm-") as scratch:
        folder = write_model_folder(Path(scratch) / "model", shape)
        return pack_tar(folder, archive_path)


def cached_tiny_lm_archive(cache_dir: Path | None = None) -> Path:
    """Return the tiny model's archive, built once per cache folder (and recipe version).

    The default folder is $SWARM_DEMO_CACHE or ~/.cache/swarm-portal. Written to a
    temporary name and renamed, so concurrent builders never see half a file.
    """
    cache_dir = cache_dir or Path(os.environ.get(
        "SWARM_DEMO_CACHE", Path.home() / ".cache" / "swarm-portal"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    archive_path = cache_dir / f"{DEMO_LM_NAME}-v{BUILD_VERSION}.tar"
    if not archive_path.exists():
        partial = archive_path.with_name(f".{archive_path.name}.{os.getpid()}")
        build_tiny_lm_archive(partial)
        os.replace(partial, archive_path)
    return archive_path


def main(argv: list[str] | None = None) -> int:
    """Write the tiny model's archive to the path given: `python -m registry.demo_lm out.tar`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m registry.demo_lm",
        description="Build the tiny demo language model (random weights, 512 tokens of "
                    "context) and write it as an hf_causal_lm tar archive, ready to upload.")
    parser.add_argument("archive", type=Path, help="where to write the .tar (e.g. tiny-lm.tar)")
    args = parser.parse_args(argv)
    if not args.archive.parent.is_dir():
        parser.error(f"the folder {args.archive.parent} does not exist")
    if args.archive.is_dir():
        parser.error(f"{args.archive} is a folder: name the .tar file to write")
    # Built beside the target and renamed: an interrupted build leaves no half archive.
    partial = args.archive.with_name(f".{args.archive.name}.{os.getpid()}")
    try:
        build_tiny_lm_archive(partial)
        os.replace(partial, args.archive)
    finally:
        partial.unlink(missing_ok=True)
    print(f"wrote {args.archive} ({args.archive.stat().st_size} bytes, format hf_causal_lm)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
