"""A byte-level BPE tokenizer trained locally with `tokenizers`, wrapped for transformers."""

from __future__ import annotations

from collections.abc import Iterable

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def train_tokenizer(paragraphs: Iterable[str], vocab_size: int, model_max_length: int):
    """BPE over bytes: every string is encodable, no unknown token. Returns a PreTrainedTokenizerFast.

    No BOS is added automatically (like GPT-2): callers and lm-eval add the special tokens they want."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(paragraphs, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=model_max_length
    )
