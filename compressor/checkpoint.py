"""Facts about a checkpoint directory read from safetensors headers: no torch, no weights loaded."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(length))


def tensor_shapes(model_dir: str | Path) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        for name, info in safetensors_header(f).items():
            if name != "__metadata__":
                shapes[name] = info["shape"]
    return shapes


def num_params(model_dir: str | Path) -> int:
    """Stored elements (for packed quantized tensors this counts the packed storage, not logical weights)."""
    return sum(math.prod(s) for s in tensor_shapes(model_dir).values())


def weight_bytes(model_dir: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(model_dir).iterdir() if f.suffix in WEIGHT_SUFFIXES)


def content_hash(model_dir: str | Path) -> str:
    """sha256 over every file's name and bytes, in name order (reproducibility check of outputs)."""
    digest = hashlib.sha256()
    for f in sorted(Path(model_dir).rglob("*")):
        if f.is_file():
            digest.update(str(f.relative_to(model_dir)).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()
