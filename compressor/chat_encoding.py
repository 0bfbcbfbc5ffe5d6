"""One chat example as token ids, the prompt's apart from the answer's: rendered with the tokenizer's chat template or a
plain `{prompt}` template, then fitted into a sequence. Shared by the chat shards of distillation
(compressor/chat_data.py) and the zoo's fine-tuning of its task teachers, which must see examples the same way."""

from __future__ import annotations

from typing import Optional

from compressor.errors import UserError


def check_template(tokenizer, template: Optional[str], where: str) -> None:
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{where}: chat data needs a chat template, and the tokenizer has none: set `chat.template` to a plain "
            'template with a {prompt} placeholder (e.g. "{prompt}\\nAnswer: "), or give the tokenizer a chat template'
        )
    if template is not None and "{prompt}" not in template:
        raise UserError(f"{where}: chat.template {template!r} has no {{prompt}} placeholder")


def encode(tokenizer, messages: list[dict], response: str, template: Optional[str]) -> tuple[list[int], list[int]]:
    """(prompt token ids, answer token ids) of one example."""
    prompt_ids, answer_ids, _ = encode_with_starts(tokenizer, messages, response, template)
    return prompt_ids, answer_ids


def encode_with_starts(tokenizer, messages: list[dict], response: str, template: Optional[str]):
    """(prompt token ids, answer token ids, where each answer token starts in `response`: None for those outside it,
    such as the template's end-of-turn tokens and EOS)."""
    if template is None:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(prompt):
            raise UserError(
                "the tokenizer's chat template does not render the prompt as a prefix of the conversation with the "
                "answer, so the answer tokens cannot be told apart; set `chat.template` to a plain template"
            )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_text = full[len(prompt) :]
        answer = tokenizer(answer_text, add_special_tokens=False, return_offsets_mapping=True)
        shift = answer_text.find(response) if response else -1
        starts = [a - shift if shift >= 0 and shift <= a < shift + len(response) else None
                  for a, _ in answer["offset_mapping"]]  # fmt: skip
        return prompt_ids, answer["input_ids"], starts
    text = template.replace("{prompt}", "\n".join(m["content"] for m in messages))
    answer = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    starts = [a for a, _ in answer["offset_mapping"]] + [None] * len(eos)
    return tokenizer(text)["input_ids"], answer["input_ids"] + eos, starts


def template_as_jinja(tokenizer, template: str) -> str:
    """A chat template that renders exactly what `encode` trained on with the plain `template`: a student exported
    with it is prompted in use (and by the held-out evaluation) the way it learned. (The newline is an expression:
    transformers renders templates with trim_blocks, which eats a newline that follows a block tag.)"""

    def literal(text: str) -> str:  # a Jinja raw block, so braces in the template stay text
        return "{% raw %}" + text + "{% endraw %}" if text else ""

    before, _, after = template.partition("{prompt}")
    bos = tokenizer.bos_token_id is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    return (
        ("{{ bos_token }}" if bos else "")
        + literal(before)
        + "{% for m in messages if m['role'] != 'assistant' %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
        + literal(after)
        + "{% for m in messages if m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    )


def fit(prompt: list[int], answer: list[int], seq_len: int, truncate: str) -> tuple[Optional[list[int]], str]:
    """(token ids or None, "kept" | "truncated" | "dropped"): the example as it enters a sequence of seq_len."""
    if len(prompt) + len(answer) <= seq_len:
        return prompt + answer, "kept"
    if truncate == "prompt" and len(answer) < seq_len:  # at least one prompt token stays: the mask's boundary
        return prompt[len(prompt) + len(answer) - seq_len :] + answer, "truncated"
    return None, "dropped"
