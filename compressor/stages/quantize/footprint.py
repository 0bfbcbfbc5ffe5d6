"""Bytes on disk of a checkpoint's decoder linear layers, read from safetensors headers (no torch, no weights).

A float layer stores `weight` (and maybe `bias`); a GPTQ layer stores `qweight`, `qzeros`, `scales`, `g_idx`
(and maybe `bias`). Counting every tensor of those modules compares like with like."""

from __future__ import annotations

from pathlib import Path

from compressor.models.checkpoint import safetensors_header

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tensor_bytes(model_dir: str | Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        for name, info in safetensors_header(f).items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                sizes[name] = end - start
    return sizes


def is_linear(tensor_name: str) -> bool:
    module = tensor_name.rsplit(".", 1)[0]
    return module.rsplit(".", 1)[-1] in LINEAR_NAMES


def linear_bytes(model_dir: str | Path) -> int:
    return sum(size for name, size in tensor_bytes(model_dir).items() if is_linear(name))


def total_bytes(model_dir: str | Path) -> int:
    return sum(tensor_bytes(model_dir).values())
