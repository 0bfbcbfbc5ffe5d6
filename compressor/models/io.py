"""Loading and saving models and tokenizers through transformers, and measuring a loaded model.

torch and transformers are imported inside the functions: `import compressor.models` stays light for validate/plan."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def load_model(path: str | Path, dtype: str = "float32", revision: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    from compressor import remote_code

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    torch_dtype = "auto" if dtype == "auto" else dtypes[dtype]
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch_dtype, revision=revision, trust_remote_code=remote_code.enabled()
    )
    return model.eval()


def load_tokenizer(path: str | Path, revision: str | None = None):
    from transformers import AutoTokenizer

    from compressor import remote_code

    return AutoTokenizer.from_pretrained(str(path), revision=revision, trust_remote_code=remote_code.enabled())


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Token-level perplexity of `model` over [n, seq_len] token blocks (next-token NLL, mean over tokens)."""
    import torch

    total_nll, total_tokens = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start : start + batch_size].to(device)
            logits = model(input_ids=batch).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += nll.item()
            total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def save_checkpoint(model, tokenizer, out_dir: str | Path) -> None:
    """save_pretrained as safetensors, plus a tokenizer that transformers 4.x can also read."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(tokenizer, out_dir)


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    """tokenizer.save_pretrained, with a tokenizer_class that transformers 4.x can also read."""
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    cfg_path = out_dir / "tokenizer_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("tokenizer_class") == "TokenizersBackend":  # transformers 5 name; 4.x cannot read it
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
            cfg_path.write_text(json.dumps(cfg, indent=2))
