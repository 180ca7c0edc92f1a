"""Calibration windows and evaluation streams: shapes, determinism, sources, errors."""

from __future__ import annotations

import time

import pytest
import torch
from text_helpers import SAMPLE_TEXT, char_tokenizer

from gradprobe import data, embedded


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def test_random_windows_are_slices_of_the_stream():
    ids = torch.arange(1000, dtype=torch.long) * 7
    w = data.random_windows(ids, nsamples=12, seqlen=50, seed=3)
    assert w.shape == (12, 50) and w.dtype == torch.long
    starts = w[:, 0] // 7
    assert bool((starts >= 0).all()) and bool((starts <= 950).all())
    for row, s in zip(w, starts.tolist(), strict=True):
        assert torch.equal(row, ids[s : s + 50])


def test_random_windows_seeded_and_global_rng_untouched():
    ids = torch.arange(5000)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = data.random_windows(ids, 8, 64, seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, data.random_windows(ids, 8, 64, seed=0))
    assert not torch.equal(a, data.random_windows(ids, 8, 64, seed=1))


def test_window_exactly_the_text_length():
    ids = torch.arange(64)
    w = data.random_windows(ids, 3, 64)
    assert torch.equal(w, ids.expand(3, 64))


def test_too_short_text_names_nsamples_and_seqlen():
    with pytest.raises(ValueError, match=r"seqlen=65.*nsamples=4"):
        data.random_windows(torch.arange(64), 4, 65)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_sizes_raise(bad, tok):
    with pytest.raises((ValueError, TypeError), match="nsamples"):
        data.calibration_batches(tok, [SAMPLE_TEXT], nsamples=bad, seqlen=8)
    with pytest.raises((ValueError, TypeError), match="seqlen"):
        data.calibration_batches(tok, [SAMPLE_TEXT], nsamples=2, seqlen=bad)


def test_calibration_from_strings_matches_tokenized_text(tok):
    docs = [SAMPLE_TEXT[:3000], SAMPLE_TEXT[3000:]]
    b = data.calibration_batches(tok, docs, nsamples=5, seqlen=32, seed=7)
    stream = torch.tensor(tok("\n\n".join(docs))["input_ids"])
    assert b.shape == (5, 32) and b.dtype == torch.long
    assert torch.equal(b, data.random_windows(stream, 5, 32, seed=7))


def test_calibration_from_local_file(tok, tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text(SAMPLE_TEXT, encoding="utf-8")
    from_file = data.calibration_batches(tok, str(f), nsamples=4, seqlen=16, seed=1)
    from_list = data.calibration_batches(tok, [SAMPLE_TEXT], nsamples=4, seqlen=16, seed=1)
    assert torch.equal(from_file, from_list)
    assert torch.equal(data.eval_ids(tok, f), torch.tensor(tok(SAMPLE_TEXT)["input_ids"]))


def test_empty_calibration_text_raises(tok, tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("")
    with pytest.raises(ValueError, match="nsamples=2"):
        data.calibration_batches(tok, str(f), nsamples=2, seqlen=16)
    with pytest.raises(ValueError, match="fewer than one window"):
        data.calibration_batches(tok, ["short"], nsamples=2, seqlen=16)


def test_unknown_source_raises(tok):
    with pytest.raises(ValueError, match="not an existing text file"):
        data.calibration_batches(tok, "no/such/file.txt", nsamples=1, seqlen=4)
    with pytest.raises(TypeError, match="source"):
        data.calibration_batches(tok, 42, nsamples=1, seqlen=4)
    with pytest.raises(TypeError, match="str"):
        data.calibration_batches(tok, ["ok", 3], nsamples=1, seqlen=4)


def test_hub_source_offline_fails_fast_with_clear_error(tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(data.DataSourceError, match="wikitext2.*local text file"):
        data.calibration_batches(tok, "wikitext2", nsamples=1, seqlen=4)
    assert time.perf_counter() - t < 15, "offline hub access must fail without network timeouts"


def test_default_sources_are_embedded_and_disjoint(tok):
    assert data.describe_source(None) == "embedded:enwiki"
    assert data.describe_source(None, purpose="eval") == "embedded:lee_background"
    calib = data.calibration_batches(tok, None, nsamples=4, seqlen=128)
    assert calib.shape == (4, 128)
    ev = data.eval_ids(tok)
    assert ev.dim() == 1 and torch.equal(
        ev[:50], torch.tensor(tok(embedded.default_text("lee_background")[:50])["input_ids"])
    )
