"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``) trained on curated Chinese and English texts."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from m6 import storage
from m6.config import SPECIAL_TOKENS


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """Train a byte-level BPE whose ids 0..4 are ``m6.config.SPECIAL_TOKENS``.

    Byte-level means every string, Chinese included, encodes without unknown tokens
    and decodes back to itself. No post-processor is attached: callers add ``<s>``/``</s>``.

    Args:
        texts: the training corpus, streamed (never materialised here).
        vocab_size: target vocabulary size including the 256 byte symbols and the specials.
        min_frequency: pairs seen fewer times are not merged.

    Returns:
        A ``tokenizers.Tokenizer``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(s)) == s exactly; Chinese has no spaces to prefix anyway.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_nonempty(texts), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"special token {t!r} got id {tok.token_to_id(t)}, expected {i}")
    return tok


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if t:
            yield t


def save_tokenizer(tok, uri: str) -> None:
    """Write ``tokenizer.json`` to a local path or ``s3://`` URI."""
    storage.write_text(uri, tok.to_str())


def load_tokenizer(uri: str):
    """Load a ``tokenizer.json`` (a file URI, or a dataset/run folder holding one).

    Raises:
        FileNotFoundError: naming the URI when there is no tokenizer there.
    """
    from tokenizers import Tokenizer

    if not uri.endswith(".json"):
        uri = storage.join(uri, "tokenizer.json")
    tok = Tokenizer.from_str(storage.read_text(uri))
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise ValueError(f"{uri}: special token {t!r} has id {tok.token_to_id(t)}, expected {i}")
    return tok
