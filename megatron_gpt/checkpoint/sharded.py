"""The sharded checkpoint format: every rank writes only what it holds, nothing is pickled.

    TAG/shards/rank00003.safetensors   one file per rank: its pieces, and in the header's
                                       `__metadata__` the JSON index of those pieces and its RNG state
    TAG/metadata.json                  written last (store.py): config, step, optimizer step and
                                       learning rates, LR-schedule state, tokenizer, the shard files

A piece is one contiguous run of one tensor as a rank holds it: `kind` (param, exp_avg or
exp_avg_sq) of canonical parameter `name`, whose global shape is `shape`; the rank's
tensor-parallel slice is chunk `tp = [dim, count, index]` of it (count 1: replicated), and the
piece is elements [start, end) of that slice flattened (a ZeRO partition; the whole slice without
ZeRO). Safetensors keys are `{kind}/{name}`. The reader (`Sharded`) rebuilds any region of any
tensor, for any other layout, reading only the element ranges it needs with safetensors'
`get_slice`; metadata is JSON, so no file is ever unpickled.

Files are written by `write_file`, streaming each tensor's bytes straight from its storage (the
library's `save_file` first copies every tensor into one bytes object: a second copy of the shard
in host memory at every save). The result is plain safetensors, read back by `safe_open`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_gpt.checkpoint.errors import CheckpointError

FORMAT = "megatron-gpt-sharded"
VERSION = 2
SHARDS_DIR = "shards"
KINDS = ("param", "exp_avg", "exp_avg_sq")
"""fp32 weights and AdamW's per-parameter moments (its step count is one number, in metadata.json)."""

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8",
           torch.int64: "I64", torch.int32: "I32"}


def shard_name(rank: int) -> str:
    return f"{SHARDS_DIR}/rank{rank:05d}.safetensors"


@dataclass(frozen=True)
class Piece:
    """Where one stored run of elements sits in the global tensor (see the module docstring)."""

    kind: str
    name: str
    shape: tuple[int, ...]
    tp: tuple[int, int, int]
    start: int
    end: int

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.name}"

    def to_json(self) -> list:
        return [self.kind, self.name, list(self.shape), list(self.tp), self.start, self.end]

    @classmethod
    def from_json(cls, item: list) -> "Piece":
        kind, name, shape, tp, start, end = item
        return cls(kind, name, tuple(shape), tuple(tp), int(start), int(end))


def local_shape(shape: tuple[int, ...], tp: tuple[int, int, int]) -> tuple[int, ...]:
    """The shape of tensor-parallel chunk `tp` of a tensor of global `shape`."""
    dim, count, _ = tp
    out = list(shape)
    if count > 1:
        out[dim] //= count
    return tuple(out)


def write_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Write a safetensors file under a temporary name, then rename it; returns its size in bytes."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data section to 8 bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for tensor in tensors.values():
            if tensor.numel():
                f.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return 8 + len(encoded) + offset


def _open(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), "pt")
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors shard ({error}); fix: the save that wrote it did "
                              "not finish or the file was damaged: use another checkpoint") from None


class Sharded:
    """The shard files of one checkpoint, read lazily: only the headers are parsed on open."""

    def __init__(self, folder: Path, files: list[str]):
        self.folder = folder
        self.files = files
        self.pieces: dict[str, list[tuple[str, Piece]]] = {}
        self.rank_meta: dict[str, dict[str, Any]] = {}
        missing = [name for name in files if not (folder / name).is_file()]
        if missing or not files:
            raise CheckpointError(f"{folder}: shard files {missing[:3] or '(none listed)'} are missing; fix: copy the "
                                  "checkpoint folder completely")
        for name in files:
            with _open(folder / name) as handle:
                meta = handle.metadata() or {}
            try:
                index = json.loads(meta["pieces"])
                self.rank_meta[name] = json.loads(meta.get("rank", "{}"))
            except (KeyError, ValueError) as error:
                raise CheckpointError(f"{folder / name}: no piece index in its header ({error}); fix: use a checkpoint "
                                      f"written by megatron-gpt ({FORMAT})") from None
            for item in index:
                piece = Piece.from_json(item)
                self.pieces.setdefault(piece.key, []).append((name, piece))
        self._handles: dict[str, Any] = {}

    def has(self, kind: str, name: str) -> bool:
        return f"{kind}/{name}" in self.pieces

    def names(self, kind: str = "param") -> list[str]:
        return sorted(key.split("/", 1)[1] for key in self.pieces if key.startswith(kind + "/"))

    def global_shape(self, kind: str, name: str) -> tuple[int, ...]:
        return self.pieces[f"{kind}/{name}"][0][1].shape

    def _slice(self, file: str, key: str, start: int, end: int) -> torch.Tensor:
        if file not in self._handles:
            self._handles[file] = _open(self.folder / file).__enter__()
        return self._handles[file].get_slice(key)[start:end]

    def rng(self, rank: int) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """Rank `rank`'s torch CPU RNG state tensor and its other RNG states (JSON), if saved."""
        name = shard_name(rank)
        if name not in self.rank_meta:
            return None, {}
        keys = self._open_keys(name)
        state = self._slice(name, "rng/torch", 0, None) if "rng/torch" in keys else None
        return state, self.rank_meta[name].get("rng", {})

    def _open_keys(self, file: str) -> set[str]:
        if file not in self._handles:
            self._handles[file] = _open(self.folder / file).__enter__()
        return set(self._handles[file].keys())

    def read(self, kind: str, name: str, shape: tuple[int, ...], tp: tuple[int, int, int] = (0, 1, 0),
             start: int = 0, end: int | None = None, fit: bool = False) -> torch.Tensor:
        """Elements [start, end) (flattened) of tensor-parallel chunk `tp` of tensor `kind/name`, as
        a layout whose global shape is `shape` holds it. With `fit`, dim 0 may differ from the saved
        shape (a vocabulary padded for another tensor size): rows beyond the saved ones read as zeros.
        Returns the chunk's shape when the whole chunk is asked for, else a flat tensor."""
        stored = self.pieces.get(f"{kind}/{name}")
        if not stored:
            raise CheckpointError(f"{self.folder}: no {kind} for parameter {name}; fix: use the model section the "
                                  "checkpoint was saved with (e.g. model.tie_embeddings, model.num_layers)")
        saved = stored[0][1].shape
        if len(saved) != len(shape) or tuple(saved[int(fit):]) != tuple(shape[int(fit):]):
            raise CheckpointError(f"parameter {name}: the checkpoint holds shape {tuple(saved)}, this run's model needs "
                                  f"{tuple(shape)}; fix: use the model section the checkpoint was saved with")
        want = local_shape(shape, tp)
        numel = math.prod(want)
        end = numel if end is None else end
        row = math.prod(want[1:]) if len(want) > 1 else 1
        r0, r1 = start // row, -(-end // row)
        # The global box this request covers: rows [g0, g1) of dim 0, and along the chunked dim its chunk.
        box = [[0, n] for n in shape]
        dim, count, index = tp
        box[0] = [r0, r1]
        if count > 1:
            if dim == 0:
                box[0] = [index * want[0] + r0, index * want[0] + r1]
            else:
                box[dim] = [index * want[dim], (index + 1) * want[dim]]
        buffer = torch.zeros((r1 - r0, *want[1:]), dtype=torch.float32)
        by_chunk: dict[tuple[int, int, int], list[tuple[str, Piece]]] = {}
        for file, piece in stored:
            by_chunk.setdefault(piece.tp, []).append((file, piece))
        for chunk, pieces in by_chunk.items():
            self._fill(buffer, box, saved, chunk, pieces)
        flat = buffer.reshape(-1)[start - r0 * row: end - r0 * row]
        return buffer.reshape(want) if (start, end) == (0, numel) else flat

    def _fill(self, buffer: torch.Tensor, box: list[list[int]], saved: tuple[int, ...],
              chunk: tuple[int, int, int], pieces: list[tuple[str, Piece]]) -> None:
        """Copy the part of saved chunk `chunk` that falls in `box` into `buffer` (which holds `box`)."""
        have = local_shape(saved, chunk)
        dim, count, index = chunk
        origin = [0] * len(saved)
        if count > 1:
            origin[dim] = index * have[dim]
        lo = [max(b[0], o) for b, o in zip(box, origin)]
        hi = [min(b[1], o + n) for b, o, n in zip(box, origin, have)]
        if any(a >= b for a, b in zip(lo, hi)):
            return
        row = math.prod(have[1:]) if len(have) > 1 else 1
        s0, s1 = lo[0] - origin[0], hi[0] - origin[0]  # rows of the saved chunk that are needed
        rows = torch.zeros((s1 - s0) * row, dtype=torch.float32)
        for file, piece in pieces:
            a, b = max(piece.start, s0 * row), min(piece.end, s1 * row)
            if a < b:
                rows[a - s0 * row: b - s0 * row] = self._slice(file, piece.key, a - piece.start, b - piece.start).float()
        rows = rows.view(s1 - s0, *have[1:])
        source = rows[tuple([slice(None)] + [slice(l - o, h - o) for l, h, o in zip(lo[1:], hi[1:], origin[1:])])]
        target = buffer[tuple(slice(l - b[0], h - b[0]) for l, h, b in zip(lo, hi, box))]
        target.copy_(source)

    def full(self, kind: str, name: str, rows: int | None = None) -> torch.Tensor:
        """The whole tensor (rows: its dim 0 cut or zero-padded to this many)."""
        shape = self.global_shape(kind, name)
        return self.read(kind, name, (rows if rows is not None else shape[0], *shape[1:]), fit=rows is not None)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()
