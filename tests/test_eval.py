"""Perplexity: equals a direct loss computation written here, for disjoint and overlapping windows."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_llama

from gradprobe.eval import PerplexityResult, perplexity, sliding_windows


@pytest.fixture(scope="module")
def model():
    return tiny_llama(num_layers=2, hidden=32, intermediate=64, heads=4, kv_heads=2, vocab=64, max_pos=128)


def _direct_ppl(model, ids, context, stride, max_windows=None):
    """The Hugging Face guide's loop, one window at a time, using the model's own ``labels=`` loss."""
    nll_sum, count, prev_end, windows = 0.0, 0, 0, 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + context, ids.numel())
        trg_len = end - prev_end
        inp = ids[begin:end][None]
        labels = inp.clone()
        labels[:, :-trg_len] = -100
        n_scored = int((labels[:, 1:] != -100).sum())
        if n_scored:
            with torch.no_grad():
                loss = model(input_ids=inp, labels=labels).loss
            nll_sum += float(loss) * n_scored
            count += n_scored
            windows += 1
        prev_end = end
        if end == ids.numel() or (max_windows and windows == max_windows):
            break
    return math.exp(nll_sum / count), count


@pytest.mark.parametrize(
    "n,context,stride,batch",
    [(256, 32, 32, 4), (250, 32, 32, 3), (250, 32, 8, 4), (100, 40, 13, 2), (31, 64, 64, 1)],
    ids=lambda v: str(v),
)
def test_matches_direct_loss(model, n, context, stride, batch):
    ids = torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n))
    res = perplexity(model, ids, context=context, stride=stride, batch_size=batch, progress=False)
    want, count = _direct_ppl(model, ids, context, stride)
    assert isinstance(res, PerplexityResult)
    assert (res.context, res.stride, res.tokens) == (context, stride, count)
    assert res.value == pytest.approx(want, rel=1e-5)


def test_disjoint_windows_score_every_token_but_the_first_of_each(model):
    ids = torch.randint(0, 64, (4 * 32,))
    res = perplexity(model, ids, context=32, progress=False)
    assert res.windows == 4 and res.tokens == 4 * 31
    with torch.no_grad():
        x = ids.view(4, 32)
        direct = torch.exp(model(input_ids=x, labels=x).loss)
    assert res.value == pytest.approx(float(direct), rel=1e-5)


def test_overlapping_windows_score_each_token_once():
    wins = sliding_windows(100, context=40, stride=13)
    scored = [t for _, e, f in wins for t in range(f, e)]
    assert scored == list(range(1, 100))
    assert all(e - b <= 40 for b, e, _ in wins)


def test_max_windows_limits_the_evaluation(model):
    ids = torch.randint(0, 64, (300,))
    res = perplexity(model, ids, context=32, max_windows=3, progress=False)
    want, count = _direct_ppl(model, ids, 32, 32, max_windows=3)
    assert (res.windows, res.tokens) == (3, count)
    assert res.value == pytest.approx(want, rel=1e-5)


def test_model_state_restored(model):
    model.train()
    perplexity(model, torch.randint(0, 64, (40,)), context=16, progress=False)
    assert model.training
    model.eval()


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(context=1), ValueError, "context"),
        (dict(context=16, stride=17), ValueError, "stride"),
        (dict(context=16, stride=0), ValueError, "stride"),
        (dict(context=16, max_windows=0), ValueError, "max_windows"),
        (dict(context=16, batch_size=0), ValueError, "batch_size"),
    ],
)
def test_bad_arguments(model, kwargs, err, match):
    with pytest.raises(err, match=match):
        perplexity(model, torch.randint(0, 64, (40,)), progress=False, **kwargs)


def test_bad_ids(model):
    with pytest.raises(TypeError, match="int64"):
        perplexity(model, torch.rand(40), progress=False)
    with pytest.raises(ValueError, match="shape"):
        perplexity(model, torch.randint(0, 64, (2, 40)), progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(model, torch.tensor([3]), progress=False)
