"""The Wanda statistic's per-window partials do not depend on how windows are batched."""

import pytest
import torch

from gradprobe.stats import sample_sums_of_squares, sum_of_squares


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape", [(1, 7, 8), (3, 32, 64), (8, 256, 576), (2, 256, 1536), (4, 513, 192), (2, 3, 5, 40)]
)
def test_batched_partials_equal_per_window_sums(shape, dtype):
    """Row s of sample_sums_of_squares(x) has the bits of sum_of_squares(window s alone), for every
    thread count (the batched CPU reduction must not change any window's summation order)."""
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * torch.rand(shape[-1], generator=g) * 10).to(dtype)
    windows = x.reshape(-1, shape[-2], shape[-1])
    expected = torch.stack([sum_of_squares(w.clone()) for w in windows])
    threads = torch.get_num_threads()
    try:
        for t in sorted({1, threads}):
            torch.set_num_threads(t)
            got = sample_sums_of_squares(x)
            assert got.dtype == torch.float32 and got.shape == (windows.shape[0], shape[-1])
            assert torch.equal(got, expected), f"threads={t}"
            # a non-contiguous batch (windows strided in memory) gives the same bits
            assert torch.equal(sample_sums_of_squares(torch.cat([x, x], dim=-1)[..., : shape[-1]]), expected)
    finally:
        torch.set_num_threads(threads)


def test_two_dim_input_is_one_window():
    x = torch.randn(16, 32)
    assert torch.equal(sample_sums_of_squares(x), sum_of_squares(x)[None])
