"""The chat template of the zoo's task models: plain text a few-million-parameter model can learn in minutes.

    <user turn>\n ... Answer: <answer></s>\n

Rendering with `add_generation_prompt` ends at "Answer:", a prefix of the rendered conversation with the answer,
so the answer tokens of a rendered example are exactly those after the prompt's (compressor/chat_data.py). An
answer is trimmed: the model generates " os" after "Answer:", a labelled row says "os"; both render "Answer: os"."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}Answer: {{ m['content'] | trim }}{{ eos_token }}\n"
    "{% else %}{{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Answer:{% endif %}"
)


def add_chat_template(model_dir: Path) -> None:
    """Write CHAT_TEMPLATE beside the tokenizer (chat_template.jinja: what transformers 5 reads and writes)."""
    (Path(model_dir) / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
