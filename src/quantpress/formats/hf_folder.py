"""Reading Hugging Face model folders lazily and writing output files atomically.

A folder is `config.json` plus `model.safetensors` or shards listed in
`model.safetensors.index.json` (AutoGPTQ's `gptq_model-*.safetensors` names are found too).
Tensors are read one at a time through `safe_open`, so callers hold only what they ask for —
the quantization pipeline reads one decoder layer at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from quantpress.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path.name} not found in {path.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the model, in a stable order."""
    index = folder / INDEX_NAME
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise CheckpointError(
                f"{folder} holds only pickle weights (.bin/.pt); quantpress reads safetensors "
                "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))"
            )
        raise CheckpointError(f"no .safetensors weights found in {folder}")
    return files


class ModelFolder:
    """A model folder opened for lazy, validated tensor access. Use as a context manager."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"model folder not found: {self.path}")
        self.config = read_json(self.path / "config.json")
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}  # tensor name -> open safe_open handle
        try:
            for file in _weight_files(self.path):
                handle = self._open(file)
                for name in handle.keys():
                    if name in self._handles:
                        raise CheckpointError(f"tensor {name} appears in more than one file")
                    self._handles[name] = handle
        except BaseException:
            self._stack.close()
            raise

    def _open(self, file: Path):
        if not file.exists():
            raise CheckpointError(f"weight file {file.name} listed in the index is missing")
        try:
            # safetensors validates the header against the file size here, so a truncated
            # download fails now, naming the file, instead of mid-run.
            return self._stack.enter_context(safe_open(str(file), framework="pt"))
        except SafetensorError as e:
            raise CheckpointError(f"{file} is not a valid safetensors file (truncated?): {e}") from None

    def __enter__(self) -> ModelFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def names(self) -> list[str]:
        return list(self._handles)

    def with_prefix(self, prefix: str) -> list[str]:
        return [name for name in self._handles if name.startswith(prefix)]

    def get(self, name: str) -> torch.Tensor:
        if name not in self._handles:
            raise CheckpointError(f"tensor {name} not found in {self.path}")
        return self._handles[name].get_tensor(name)  # type: ignore[attr-defined]

    def shape(self, name: str) -> list[int]:
        if name not in self._handles:
            raise CheckpointError(f"tensor {name} not found in {self.path}")
        return list(self._handles[name].get_slice(name).get_shape())  # type: ignore[attr-defined]

    def nbytes(self, name: str) -> int:
        return slice_nbytes(self._handles[name].get_slice(name))  # type: ignore[attr-defined]


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def slice_nbytes(sl) -> int:
    """Size of a tensor from its safetensors header (a `safe_open(...).get_slice(name)`)."""
    numel = 1
    for dim in sl.get_shape():
        numel *= dim
    return numel * _DTYPE_BYTES[sl.get_dtype()]


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so readers see either the old content or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp",
                                     encoding="utf-8") as tmp:
        tmp.write(text)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def plan_shards(sizes: Iterable[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Group tensor names into shards of at most `max_shard_bytes` (a single larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def write_sharded(
    folder: Path,
    sizes: list[tuple[str, int]],
    load: callable,  # name -> Tensor; called shard by shard so memory holds one shard at a time
    max_shard_bytes: int,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write `model.safetensors`, or HF-style shards plus an index when over `max_shard_bytes`."""
    shards = plan_shards(sizes, max_shard_bytes)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [
        f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)
    ]
    weight_map: dict[str, str] = {}
    for file_name, shard in zip(names, shards):
        atomic_save_tensors(folder / file_name, {name: load(name) for name in shard}, metadata)
        weight_map.update(dict.fromkeys(shard, file_name))
    if n > 1:
        total = sum(size for _, size in sizes)
        atomic_write_json(folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer and generation files a loader needs next to the weights."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def iter_tensor_files(folder: Path) -> Iterator[Path]:
    yield from sorted(folder.glob("*.safetensors"))
