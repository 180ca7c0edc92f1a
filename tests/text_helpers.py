"""A character-level Hugging Face fast tokenizer built in the test (no downloads), for tiny models."""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SAMPLE_TEXT = (
    "Hundreds of people have been forced to vacate their homes as strong winds pushed a huge bushfire "
    "towards the town. A new blaze near the highway has forced its closure. "
) * 40


def char_tokenizer(vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """One token per character: printable ASCII get their own ids, everything else is [UNK] (id 0)."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"[UNK]": 0} | {c: i + 1 for i, c in enumerate(chars[: vocab_size - 1])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", model_max_length=64)
