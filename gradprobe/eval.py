"""Perplexity with a fixed context length and stride (state both: published numbers depend on them).

Sliding-window evaluation as in the Hugging Face guide
(https://huggingface.co/docs/transformers/perplexity): windows of ``context`` tokens start every
``stride`` tokens; each token is scored once, in the first window that reaches it, conditioned on the
tokens before it inside that window. With ``stride == context`` (the default) the windows are
disjoint and the first token of each window is not scored.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True)
class PerplexityResult:
    """exp(mean token NLL) over ``tokens`` scored tokens, with ``windows`` windows of ``context`` every ``stride``."""

    value: float
    context: int
    stride: int
    tokens: int
    windows: int
    nll: float  # mean negative log-likelihood per scored token (nats)

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.2f} (context {self.context}, stride {self.stride}, {self.windows} windows, {self.tokens} scored tokens)"


def sliding_windows(
    n_tokens: int, context: int, stride: int, max_windows: int | None = None
) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window: tokens [begin, end) are input, [first_scored, end) are scored."""
    out = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        first = max(prev_end, begin + 1)
        if end - begin >= 2 and first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n_tokens or (max_windows is not None and len(out) >= max_windows):
            break
    return out


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def perplexity(
    model,
    ids: torch.Tensor,
    *,
    context: int = 256,
    stride: int | None = None,
    device: str | torch.device | None = None,
    max_windows: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of a causal LM on a token stream.

    Args:
        model: a causal LM returning ``.logits`` of shape (batch, seq, vocab) for ``input_ids``.
        ids: (n_tokens,) or (1, n_tokens) int64 token ids.
        context: tokens per window (the model sees at most this many).
        stride: window step, 1 <= stride <= context (default ``context``: disjoint windows).
        device: where the forward passes run; the model is moved there and back if it is elsewhere
            (default: the model's device).
        max_windows: evaluate only the first this-many windows (None = the whole stream).
        batch_size: windows per forward pass.
        progress: show a tqdm bar.

    Returns:
        :class:`PerplexityResult` (value = exp of the mean NLL over all scored tokens, in fp32/fp64).
    """
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        raise TypeError("ids must be an int64 tensor of token ids, shape (n_tokens,) or (1, n_tokens)")
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"ids must have shape (n_tokens,) or (1, n_tokens), got {tuple(ids.shape)}")
    for name, v in (("context", context), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if context < 2:
        raise ValueError(f"context must be >= 2 (one token of context and one scored token), got {context}")
    stride = context if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not (1 <= stride <= context):
        raise ValueError(f"stride must be an int in [1, context={context}], got {stride!r}")
    if max_windows is not None and (
        isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1
    ):
        raise ValueError(f"max_windows must be None or an int >= 1, got {max_windows!r}")
    windows = sliding_windows(ids.numel(), context, stride, max_windows)
    if not windows:
        raise ValueError(f"ids has {ids.numel()} tokens; perplexity needs at least 2")

    home = _model_device(model)
    device = home if device is None else torch.device(device)
    was_training = model.training
    model.eval()
    if device != home:
        model.to(device)
    total_nll = torch.zeros((), dtype=torch.float64)
    total_tokens = 0
    try:
        # group windows of equal length so each batch is one dense (batch, len) tensor
        groups: dict[int, list[tuple[int, int, int]]] = {}
        for w in windows:
            groups.setdefault(w[1] - w[0], []).append(w)
        bar = tqdm(total=len(windows), desc="perplexity", unit="win", disable=not progress, leave=False)
        for group in groups.values():
            for i in range(0, len(group), batch_size):
                chunk = group[i : i + batch_size]
                inputs = torch.stack([ids[b:e] for b, e, _ in chunk]).to(device)
                logits = model(input_ids=inputs, use_cache=False).logits
                # position t predicts token t+1; mask out targets that are not scored in this window
                targets = inputs[:, 1:].clone()
                for row, (b, _, first) in enumerate(chunk):
                    targets[row, : first - b - 1] = -100
                nll = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                    targets.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
                total_nll += nll.double().cpu()
                total_tokens += int((targets != -100).sum())
                bar.update(len(chunk))
        bar.close()
    finally:
        if device != home:
            model.to(home)
        model.train(was_training)
    mean_nll = float(total_nll / total_tokens)
    return PerplexityResult(
        value=math.exp(mean_nll),
        context=context,
        stride=stride,
        tokens=total_tokens,
        windows=len(windows),
        nll=mean_nll,
    )
