"""argparse ``type=`` converters shared by the command-line options (``gradprobe.cli`` and the probe's
``gradprobe.probe.cli``): each turns the option's text into a value or raises
``argparse.ArgumentTypeError`` saying what the option takes."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", int, float)


def _parse(text: str, convert: Callable[[str], T], what: str) -> T:
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def fraction(text: str) -> float:
    """A number in [0, 1) (a fraction of weights)."""
    v = _parse(text, float, "a number in [0, 1)")
    if not (0.0 <= v < 1.0):
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (the fraction of weights to prune), got {text}")
    return v


def positive_int(text: str) -> int:
    """An integer >= 1."""
    v = _parse(text, int, "a positive integer")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def nonneg_float(text: str) -> float:
    """A number >= 0."""
    v = _parse(text, float, "a number")
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v
