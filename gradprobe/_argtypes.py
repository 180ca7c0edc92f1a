"""argparse ``type=`` converters shared by the command-line options (``gradprobe.cli`` and the probe's
``gradprobe.probe.cli``): each turns the option's text into a value or raises
``argparse.ArgumentTypeError`` saying what the option takes."""

from __future__ import annotations

import argparse


def fraction(text: str) -> float:
    """A number in [0, 1) (a fraction of weights)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not (0.0 <= v < 1.0):
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (the fraction of weights to prune), got {text}")
    return v


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def nonneg_float(text: str) -> float:
    """A number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value
