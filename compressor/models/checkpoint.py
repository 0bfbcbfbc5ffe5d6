"""Facts about a checkpoint directory read from safetensors headers: no torch, no weights loaded."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")  # .gguf: a GGUF quantize stage's one weights file


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(length))


MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a .safetensors file, from its 8-byte length, JSON header and size alone (no weights
    read), or None: a file cut short by an interrupted copy or download ends before its last tensor."""
    size = path.stat().st_size
    if size < 8:
        return f"{size} bytes: too short to be a safetensors file"
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length > min(size - 8, MAX_HEADER_BYTES):
            return f"header length {length:,} does not fit in the file ({size:,} bytes): not safetensors, or truncated"
        try:
            header = json.loads(fh.read(length))
            ends = [int(info["data_offsets"][1]) for name, info in header.items() if name != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
            return "its header is not valid safetensors JSON"
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"truncated: {size:,} bytes, but its header describes {expected:,} (an interrupted copy or download?)"
    return None


def tensor_shapes(model_dir: str | Path) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        for name, info in safetensors_header(f).items():
            if name != "__metadata__":
                shapes[name] = info["shape"]
    return shapes


def num_params(model_dir: str | Path) -> int:
    """Stored elements (for packed quantized tensors this counts the packed storage, not logical weights:
    see logical_num_params)."""
    return sum(math.prod(s) for s in tensor_shapes(model_dir).values())


# GPTQ and AWQ keep a quantized linear layer as `qweight` (its weights, `bits` wide, packed into pack_dtype words
# along the input (GPTQ) or output (AWQ) dimension) plus `qzeros`, `scales` and (GPTQ) `g_idx`: quantization state,
# not parameters of the model.
QUANT_STATE_TENSORS = ("qzeros", "scales", "g_idx")
PACK_BITS = {"int8": 8, "int16": 16, "int32": 32, "int64": 64}


def _dir_fs(model_dir: str | Path):
    """(fsspec filesystem, path) of a checkpoint directory: a local path or a storage URI (s3://...)."""
    import fsspec

    return fsspec.core.url_to_fs(str(model_dir))


def _remote_headers(model_dir: str) -> dict[str, dict]:
    """Safetensors headers of a checkpoint on object storage, read by two range reads per file (no weights)."""
    fs, path = _dir_fs(model_dir)
    headers = {}
    for f in sorted(p for p in fs.ls(path, detail=False) if p.endswith(".safetensors")):
        with fs.open(f, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            headers.update(json.loads(fh.read(length)))
    return headers


def quantization_config(model_dir: str | Path) -> dict:
    """quantize_config.json of a GPTQ / AWQ checkpoint (else config.json's quantization_config, which is where a GGUF
    stage output names its file); {} when not quantized."""
    fs, path = _dir_fs(model_dir)
    for name, pick in (("quantize_config.json", lambda d: d), ("config.json", lambda d: d.get("quantization_config"))):
        target = f"{path.rstrip('/')}/{name}"
        if fs.exists(target):
            found = pick(json.loads(fs.cat_file(target)))
            if found:
                return found
    return {}


def logical_num_params(model_dir: str | Path) -> int:
    """Parameters the model has, for quantized checkpoints too: a packed `qweight` of shape [in * bits / word, out]
    counts as in * out weights, and GPTQ's quantization state (zeros, scales, group index) is not counted.
    Reads only quantize_config.json and the safetensors headers, locally or on object storage."""
    from compressor import storage

    config = quantization_config(model_dir)
    if config.get("quant_method") == "gguf":  # weights in a .gguf, not safetensors: the writer recorded the count
        return int(config["num_params"])
    if storage.is_remote(model_dir):
        shapes = {n: i["shape"] for n, i in _remote_headers(str(model_dir)).items() if n != "__metadata__"}
    else:
        shapes = tensor_shapes(model_dir)
    if not config:
        return sum(math.prod(s) for s in shapes.values())
    per_word = PACK_BITS[str(config.get("pack_dtype", "int32")).removeprefix("torch.")] / int(config["bits"])
    total = 0
    for name, shape in shapes.items():
        kind = name.rsplit(".", 1)[-1]
        if kind in QUANT_STATE_TENSORS and name.rsplit(".", 1)[0] + ".qweight" in shapes:
            continue
        total += int(shape[0] * per_word) * math.prod(shape[1:]) if kind == "qweight" else math.prod(shape)
    return total


def quantized_bits(model_dir: str | Path) -> int | None:
    """Weight bits of a quantized checkpoint, None when it is not quantized."""
    bits = quantization_config(model_dir).get("bits")
    return int(bits) if bits else None


def checkpoint_bytes(model_dir: str | Path) -> int:
    """Bytes of weight files in a checkpoint directory, local or on object storage (a listing, nothing read)."""
    fs, path = _dir_fs(model_dir)
    return sum(
        int(info["size"])
        for info in fs.ls(path, detail=True)
        if str(info["name"]).endswith(WEIGHT_SUFFIXES) and info.get("type") == "file"
    )


def weight_bytes(model_dir: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(model_dir).iterdir() if f.suffix in WEIGHT_SUFFIXES)
