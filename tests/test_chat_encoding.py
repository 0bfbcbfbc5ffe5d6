"""One chat example as token ids: the answer's tokens follow the prompt's as the template renders them, a plain
template becomes the chat template the student is exported with, and an example too long is truncated or dropped."""

from __future__ import annotations

import pytest

from compressor import chat_encoding
from compressor.errors import UserError
from compressor.models.zoo.chat import CHAT_TEMPLATE


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_answer_tokens_follow_the_prompt_tokens(tokenizer):
    prompt, answer = chat_encoding.encode(tokenizer, [{"role": "user", "content": "sqrt: Return x."}], "math", None)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "sqrt: Return x."}, {"role": "assistant", "content": "math"}], tokenize=False
    )
    assert tokenizer.decode(prompt + answer) == full
    assert tokenizer.decode(answer).strip().startswith("math") and answer[-2] == tokenizer.eos_token_id


def test_plain_template_and_missing_template(tokenizer, tiny_teacher):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny_teacher)  # the zoo tokenizer has no chat template
    with pytest.raises(UserError, match="needs a chat template"):
        chat_encoding.check_template(plain, None, "data x")
    prompt, answer = chat_encoding.encode(plain, [{"role": "user", "content": "Q"}], "A", "{prompt}\nAnswer: ")
    assert plain.decode(prompt, skip_special_tokens=True) == "Q\nAnswer: " and answer[-1] == plain.eos_token_id


def test_a_plain_template_becomes_the_chat_template_it_was_trained_with(tiny_teacher):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny_teacher)
    template = "Q: {prompt}\nAnswer {with braces}:"
    plain.chat_template = chat_encoding.template_as_jinja(plain, template)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "sqrt: Return x."}]
    prompt, answer = chat_encoding.encode(plain, messages, "math", template)
    rendered = plain.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert plain(rendered, add_special_tokens=False)["input_ids"] == prompt
    full = plain.apply_chat_template([*messages, {"role": "assistant", "content": "math"}], tokenize=False)
    assert plain(full, add_special_tokens=False)["input_ids"] == prompt + answer


def test_fit_drops_or_truncates_the_prompt():
    assert chat_encoding.fit([1, 2, 3], [4, 5], 5, "drop") == ([1, 2, 3, 4, 5], "kept")
    assert chat_encoding.fit([1, 2, 3], [4, 5], 4, "drop") == (None, "dropped")
    assert chat_encoding.fit([1, 2, 3], [4, 5], 4, "prompt") == ([2, 3, 4, 5], "truncated")
    assert chat_encoding.fit([1], [4, 5, 6, 7], 4, "prompt") == (None, "dropped")  # the answer alone fills it
