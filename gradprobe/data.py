"""Calibration windows and evaluation token streams.

Sources (``source`` argument):

* ``None``: the embedded default (:mod:`gradprobe.embedded`): calibration on the Wikipedia extract
  (``"enwiki"``), evaluation on ``"lee_background"`` news text, so the two never overlap;
* ``"enwiki"`` / ``"lee_background"``: one embedded text by name;
* a path to a local UTF-8 text file (``str`` or ``os.PathLike``);
* a list / tuple of strings (documents, joined with blank lines);
* ``"wikitext2"`` / ``"c4"``: the usual hub data sets through the ``datasets`` library, for users
  who can reach the Hugging Face Hub (the same files as the Wanda reference). With
  ``HF_HUB_OFFLINE=1`` and no local copy, this fails at once with :class:`DataSourceError`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gradprobe import embedded

HUB_SOURCES = ("wikitext2", "c4")
DEFAULT_CALIBRATION = "enwiki"
DEFAULT_EVAL = "lee_background"


class DataSourceError(RuntimeError):
    """A calibration / evaluation source cannot be read (e.g. a hub data set while offline)."""


def describe_source(source, *, purpose: str = "calibration") -> str:
    """Human-readable name of ``source`` (what the CLI prints)."""
    if source is None:
        name = DEFAULT_CALIBRATION if purpose == "calibration" else DEFAULT_EVAL
        return f"embedded:{name}"
    if isinstance(source, (list, tuple)):
        return f"{len(source)} in-memory strings"
    if isinstance(source, str) and source in embedded.TEXT_FILES:
        return f"embedded:{source}"
    if isinstance(source, str) and source in HUB_SOURCES:
        return f"hub:{source}"
    return str(source)


def _hub_text(name: str, split: str) -> str:
    """Text of a hub data set split, loaded the way the Wanda reference (lib/data.py) does."""
    try:
        from datasets import load_dataset
    except ImportError as exc:
        raise DataSourceError(f"source={name!r} needs the `datasets` package: pip install datasets") from exc
    try:
        if name == "wikitext2":
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split="train" if split == "train" else "test")
            return "\n\n".join(ds["text"])
        if split == "train":
            files = {"train": "en/c4-train.00000-of-01024.json.gz"}
        else:
            files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
        key = next(iter(files))
        ds = load_dataset("allenai/c4", data_files=files, split=key)
        if key == "validation":
            ds = ds.select(range(min(1100, len(ds))))  # Wanda evaluates on the first 1100 documents
        return "\n\n".join(ds["text"])
    except (ConnectionError, OSError, ValueError) as exc:
        offline = [
            v
            for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
            if os.environ.get(v, "").strip() in ("1", "true", "TRUE", "True")
        ]
        hint = (
            f" ({' and '.join(offline)} set: the hub is not contacted; unset it or pre-download the data set)"
            if offline
            else " (is the Hugging Face Hub reachable?)"
        )
        raise DataSourceError(
            f"could not load hub data set {name!r} split {split!r}: {type(exc).__name__}: {exc}{hint}. "
            "Pass a local text file, a list of strings, or None for the embedded offline text instead."
        ) from exc


def load_text(source=None, *, split: str = "train", purpose: str = "calibration") -> str:
    """The raw text of ``source`` (see the module docstring); ``split`` matters for hub sources only."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if source is None:
        return embedded.default_text(DEFAULT_CALIBRATION if purpose == "calibration" else DEFAULT_EVAL)
    if isinstance(source, (list, tuple)):
        if not all(isinstance(s, str) for s in source):
            raise TypeError("source as a list must hold only str documents")
        return "\n\n".join(source)
    if isinstance(source, os.PathLike) or isinstance(source, str):
        text_name = os.fspath(source)
        if text_name in HUB_SOURCES:
            return _hub_text(text_name, split)
        if text_name in embedded.TEXT_FILES:
            return embedded.default_text(text_name)
        path = Path(text_name).expanduser()
        if path.is_file():
            return path.read_text(encoding="utf-8")
        raise ValueError(
            f"source {text_name!r} is not an existing text file, an embedded text {sorted(embedded.TEXT_FILES)} "
            f"or a hub data set {list(HUB_SOURCES)}"
        )
    raise TypeError(
        f"source must be None, a file path, a list of strings, or one of {list(HUB_SOURCES)}; got {type(source).__name__}"
    )


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    if not callable(tokenizer):
        raise TypeError(
            f"tokenizer must be a Hugging Face tokenizer (callable), got {type(tokenizer).__name__}"
        )
    # verbose=False: a whole corpus is longer than model_max_length on purpose; we cut windows ourselves
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def random_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` consecutive tokens at seeded random offsets (as in Wanda).

    Args:
        ids: (n_tokens,) int64 token stream.
        nsamples, seqlen: number and length of the windows.
        seed: seeds a private ``torch.Generator`` (the global RNG is untouched).

    Returns:
        (nsamples, seqlen) int64; row i is ``ids[s_i : s_i + seqlen]`` with s_i uniform in [0, n_tokens - seqlen].
    """
    nsamples = _check_positive_int(nsamples, "nsamples")
    seqlen = _check_positive_int(seqlen, "seqlen")
    ids = ids.reshape(-1)
    if ids.numel() < seqlen:
        raise ValueError(
            f"the calibration text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen} "
            f"(nsamples={nsamples}); use a longer text or a smaller seqlen"
        )
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
    return ids[starts[:, None] + torch.arange(seqlen)]


def calibration_batches(
    tokenizer,
    source=None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
) -> torch.Tensor:
    """Calibration windows for Wanda-style pruning.

    Args:
        tokenizer: the model's Hugging Face tokenizer.
        source: see the module docstring (None = embedded Wikipedia extract).
        nsamples: number of windows (default 128, as in Wanda).
        seqlen: tokens per window (default 2048; never the model's maximum context).
        seed: seed of the window offsets; the same seed gives the same windows.

    Returns:
        (nsamples, seqlen) torch.long token ids.
    """
    nsamples = _check_positive_int(nsamples, "nsamples")
    seqlen = _check_positive_int(seqlen, "seqlen")
    ids = _tokenize(tokenizer, load_text(source, split="train", purpose="calibration"))
    return random_windows(ids, nsamples, seqlen, seed)


def eval_ids(tokenizer, source=None, split: str = "test") -> torch.Tensor:
    """The evaluation token stream of ``source`` (None = embedded ``lee_background``).

    Returns:
        (n_tokens,) torch.long token ids of the whole text.
    """
    ids = _tokenize(tokenizer, load_text(source, split=split, purpose="eval"))
    if ids.numel() < 2:
        raise ValueError(
            f"the evaluation text of source={describe_source(source, purpose='eval')!r} has fewer than 2 tokens"
        )
    return ids
