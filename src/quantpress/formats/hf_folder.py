"""Reading Hugging Face model folders lazily and writing output files atomically.

A folder is `config.json` plus `model.safetensors` or shards listed in
`model.safetensors.index.json` (AutoGPTQ's `gptq_model-*.safetensors` names are found too).
Headers are validated by `safe_open`; tensor bytes are then read with plain file reads into
buffers the caller owns, so callers hold only what they ask for (the quantization pipeline reads
one decoder layer at a time) and no memory-mapped page of the file counts against the process.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from quantpress.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SHARD_RE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")  # the names write_sharded gives
MAX_SHARD_BYTES = 5 * 10**9  # the Hub's conventional shard size
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
    """A JSON file that must hold an object (every config file quantpress reads does)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path.name} not found in {path.parent}") from None
    except (NotADirectoryError, IsADirectoryError, PermissionError) as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got a {type(value).__name__}")
    return value


# Files whose `auto_map` makes transformers import Python code shipped in the model folder.
REMOTE_CODE_CONFIGS = ("config.json", "tokenizer_config.json", "processor_config.json",
                       "preprocessor_config.json")


def check_no_remote_code(folder: Path) -> None:
    """Refuse a folder that needs its own Python code to load.

    transformers imports the modules named by an `auto_map` entry when trust_remote_code allows
    it, and when it is left unset it *asks on stdin*, so a piped "y" ran a folder's code. quantpress
    never runs code from a model folder: such a folder is refused here, before any loading, and
    every transformers call also passes trust_remote_code=False as a second line of defence."""
    for name in REMOTE_CODE_CONFIGS:
        path = folder / name
        if not path.is_file():
            continue
        auto_map = read_json(path).get("auto_map")
        if auto_map:
            entries = ", ".join(f"{k}: {v}" for k, v in auto_map.items()) if isinstance(auto_map, dict) else auto_map
            raise CheckpointError(
                f"{path} has an `auto_map` ({entries}): this model needs Python code from its folder, and "
                "quantpress never runs code from a model folder. Use a folder whose architecture "
                "transformers implements itself."
            )


def has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()


def load_tokenizer(folder: str | os.PathLike):
    """The folder's transformers tokenizer, never running code from the folder and never
    prompting (the one place quantpress builds a tokenizer)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    check_no_remote_code(folder)
    if not has_tokenizer(folder):
        raise CheckpointError(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model); copy the base "
                              "model's tokenizer files into it")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer in {folder}: {e}") from None


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


class TensorFiles:
    """Tensors spread over safetensors files, read on demand.

    Reads copy each tensor's bytes from the file into a fresh buffer (`readinto`). safetensors'
    own reader memory-maps the file, and every page it touches is counted in the process's
    resident set until the map is dropped, on top of the copy `get_tensor` returns: reading the
    168M benchmark model's 65 MB embedding that way peaked ~130 MB above what the caller holds.
    """

    def __init__(self, files: list[Path]) -> None:
        self.file_of: dict[str, Path] = {}
        self.entries: dict[str, TensorEntry] = {}
        self.spans: dict[str, tuple[int, int]] = {}  # absolute [start, end) byte offsets in the file
        for file in files:
            with _open_safetensors(file) as handle:  # validates the header against the file size
                for name in handle.keys():
                    if name in self.file_of:
                        raise CheckpointError(f"tensor {name} appears in more than one file")
                    self.file_of[name] = file
                    self.entries[name] = TensorEntry.of_slice(name, handle.get_slice(name))
                    if self.entries[name].dtype not in _TORCH_DTYPES:
                        raise CheckpointError(f"{file.name}: tensor {name} has dtype {self.entries[name].dtype}, "
                                              f"which quantpress does not read ({', '.join(_TORCH_DTYPES)})")
            self.spans.update(_data_spans(file))

    def names(self) -> list[str]:
        return list(self.file_of)

    def with_prefix(self, prefix: str) -> list[str]:
        return [name for name in self.file_of if name.startswith(prefix)]

    def entry(self, name: str) -> TensorEntry:
        if name not in self.entries:
            raise CheckpointError(f"tensor {name} not found")
        return self.entries[name]

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, opening each file involved once."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.file_of:
                raise CheckpointError(f"tensor {name} not found")
            by_file.setdefault(self.file_of[name], []).append(name)
        tensors = {}
        for file, file_names in by_file.items():
            with open(file, "rb") as f:
                for name in file_names:
                    tensors[name] = self._read_one(f, name)
        return tensors

    def _read_one(self, f: BinaryIO, name: str) -> torch.Tensor:
        entry = self.entries[name]
        start, end = self.spans[name]
        data = torch.empty(end - start, dtype=torch.uint8)
        f.seek(start)
        if f.readinto(memoryview(data.numpy())) != end - start:
            raise CheckpointError(f"{f.name} ended inside tensor {name} (truncated since it was opened?)")
        return data.view(_TORCH_DTYPES[entry.dtype]).reshape(entry.shape)

    def get(self, name: str) -> torch.Tensor:
        return self.read([name])[name]

    def dtype(self, name: str) -> torch.dtype:
        """A tensor's stored dtype, without reading it."""
        return _TORCH_DTYPES[self.entry(name).dtype]


def _open_safetensors(file: Path):
    if not file.exists():
        raise CheckpointError(f"weight file {file.name} listed in the index is missing")
    try:
        # safetensors validates the header against the file size here, so a truncated
        # download fails when the folder is opened, naming the file, instead of mid-run.
        return safe_open(str(file), framework="pt")
    except SafetensorError as e:
        raise CheckpointError(f"{file} is not a valid safetensors file (truncated?): {e}") from None


def _data_spans(file: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte ranges of every tensor, from the header: u64 little-endian length N, then N
    bytes of JSON whose `data_offsets` count from the end of the header."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    base = 8 + length
    return {name: (base + info["data_offsets"][0], base + info["data_offsets"][1])
            for name, info in header.items() if name != "__metadata__"}


class ModelFolder(TensorFiles):
    """A Hugging Face model folder: its config.json and its weights, validated on opening."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"model folder not found: {self.path}")
        self.config = read_json(self.path / "config.json")
        check_no_remote_code(self.path)
        super().__init__(_weight_files(self.path))

    def shape(self, name: str) -> list[int]:
        return list(self.entry(name).shape)

    def weight_stamps(self) -> list[tuple[str, int, int]]:
        """(name, size, mtime_ns) of each weight file: what fingerprints of work built on these
        weights record, so a changed checkpoint invalidates it without hashing gigabytes."""
        files = sorted(set(self.file_of.values()), key=lambda p: p.name)
        return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


# safetensors dtype codes; a tensor's byte size follows from the torch dtype's itemsize.
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_DTYPE_CODES = {dtype: code for code, dtype in _TORCH_DTYPES.items()}


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so readers see either the old content or the whole new one."""
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a dict of tensors as one safetensors file, atomically."""
    entries = [TensorEntry.of_tensor(name, t) for name, t in tensors.items()]
    stream_safetensors(path, entries, tensors.__getitem__, metadata)


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write to `<path>.tmp`, fsync, then rename over `path`. On any failure (a full disk) the
    temporary file is removed, so a failed write leaves the old file and no debris."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class TensorEntry:
    """What a safetensors header says about a tensor, known before its data is loaded."""

    name: str
    dtype: str  # safetensors code: "F32", "BF16", "I32", ...
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _TORCH_DTYPES[self.dtype].itemsize

    @classmethod
    def of_slice(cls, name: str, sl) -> TensorEntry:
        return cls(name, sl.get_dtype(), tuple(sl.get_shape()))

    @classmethod
    def of_tensor(cls, name: str, tensor: torch.Tensor) -> TensorEntry:
        return cls(name, _DTYPE_CODES[tensor.dtype], tuple(tensor.shape))


def stream_safetensors(path: Path, entries: list[TensorEntry], load: Callable[[str], torch.Tensor],
                       metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file one tensor at a time (the library's save_file needs all of them
    in memory at once). Layout: u64 little-endian header length, JSON header with contiguous
    `data_offsets`, padded with spaces to 8 bytes, then the raw little-endian tensor bytes."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)

    def write(f: BinaryIO) -> None:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for e in entries:
            tensor = load(e.name)
            if tensor.dtype != _TORCH_DTYPES[e.dtype] or tuple(tensor.shape) != e.shape:
                raise CheckpointError(f"{e.name}: expected {e.dtype} {list(e.shape)}, got {tensor.dtype} {list(tensor.shape)}")
            f.write(memoryview(tensor.contiguous().view(torch.uint8).numpy()))  # no bytes copy

    _atomic_write(path, write)


def plan_shards(entries: Iterable[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """Group tensors into shards of at most `max_shard_bytes` (a single larger tensor gets its own)."""
    shards: list[list[TensorEntry]] = [[]]
    used = 0
    for entry in entries:
        if shards[-1] and used + entry.nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(entry)
        used += entry.nbytes
    return shards


def write_sharded(
    folder: Path,
    entries: list[TensorEntry],
    load: Callable[[str], torch.Tensor],
    max_shard_bytes: int,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write `model.safetensors`, or HF-style shards plus an index when over `max_shard_bytes`.
    Tensors are loaded one at a time, so memory stays at the largest tensor."""
    shards = plan_shards(entries, max_shard_bytes)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    for file_name, shard in zip(names, shards):
        stream_safetensors(folder / file_name, shard, load, metadata)
        weight_map.update(dict.fromkeys((e.name for e in shard), file_name))
    if n > 1:
        total = sum(e.nbytes for e in entries)
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
