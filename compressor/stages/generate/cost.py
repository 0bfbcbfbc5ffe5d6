"""What a generate stage will cost, for `compressor plan`, before anything is sent.

- prompts: counted by reading the source (streamed: one batch in memory at a time);
- input tokens: exact from a local teacher's tokenizer (the text the hf backend sends), about 4 characters per
  token for an API model (its tokenizer is not known here);
- output tokens: at most prompts x n x max_new_tokens, and prompts x n x the measured mean answer length once
  some answers are committed (an interrupted run) or the stage has run;
- a local teacher's hours from the measured tokens/s of one actor (else `tokens_per_s`), times its GPUs;
  an API teacher's dollars from `price`."""

from __future__ import annotations

from typing import Optional

CHARS_PER_TOKEN = 4


def estimate(spec, source, tokenizer=None, measured: Optional[dict] = None) -> dict:
    from compressor import prompt_rows as prompts

    count, chars, tokens = 0, 0, 0
    for _, rows in prompts.scan(source, 256):
        for row in rows:
            count += 1
            if tokenizer is not None:
                tokens += len(tokenizer(row["messages"]))
            else:
                chars += sum(len(m["content"]) for m in row["messages"])
    exact = tokenizer is not None
    out = {
        "prompts": count,
        "input_tokens": tokens if exact else chars / CHARS_PER_TOKEN,
        "input_exact": exact,
        "output_tokens_max": count * spec.n * spec.max_new_tokens,
        "output_tokens_measured": None,
        "tokens_per_s": spec.tokens_per_s,
    }
    if measured and measured.get("answers"):
        out["output_tokens_measured"] = count * spec.n * measured["completion_tokens"] / measured["answers"]
        if measured.get("seconds"):
            out["tokens_per_s"] = measured["completion_tokens"] / measured["seconds"]
    return out


def cost_lines(spec, est: dict, num_gpus: float) -> list[str]:
    from compressor.stages.generate.job import dollars

    input_text = f"{est['input_tokens']:,.0f}" + (
        " (teacher's tokenizer)" if est["input_exact"] else " (about 4 chars per token)"
    )
    outputs = [("max", est["output_tokens_max"])]
    if est["output_tokens_measured"] is not None:
        outputs.append(("measured mean", est["output_tokens_measured"]))
    output_text = ", ".join(f"{v:,.0f} ({label})" for label, v in outputs)
    lines = [f"{est['prompts']:,} prompts; input tokens {input_text}; output tokens {output_text}"]
    for label, out_tokens in outputs:
        if spec.api_model:
            if spec.price is not None:
                lines.append(f"cost ({label}): ${dollars(spec.price, est['input_tokens'], out_tokens):,.4f}")
        elif est["tokens_per_s"]:
            hours = out_tokens / est["tokens_per_s"] / 3600
            what = f"{hours * num_gpus:,.3f} GPU-hours" if num_gpus else f"{hours:,.3f} actor-hours (CPU)"
            lines.append(f"time ({label}): {what} at {est['tokens_per_s']:,.1f} tokens/s per actor")
    if spec.api_model and spec.price is None:
        lines.append("cost: set `price: {input_per_mtok, output_per_mtok}` for a dollar figure")
    if not spec.api_model and not est["tokens_per_s"]:
        lines.append("time: set `tokens_per_s` (one actor's answer tokens/s) for GPU-hours until one is measured")
    return lines


def local_tokenizer(teacher_path: str):
    """A torch-free counter of a local teacher's prompt tokens: `tokenizers` over the hf backend's prompt text, or
    transformers' chat template when the teacher has one."""
    import json
    from pathlib import Path

    from compressor.models import resolve_model

    path = Path(resolve_model(teacher_path)[0])
    config = (
        json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").is_file() else {}
    )
    if config.get("chat_template") or (path / "chat_template.jinja").is_file():
        from transformers import AutoTokenizer

        from compressor import remote_code
        from compressor.stages.generate.hf_backend import chat_text

        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=remote_code.enabled())
        return lambda messages: tok(chat_text(tok, messages), add_special_tokens=False)["input_ids"]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    return lambda messages: tok.encode("".join(f"{m['content']}\n\n" for m in messages)).ids
