"""argparse types the jobs share: numbers refused by the parser, before a job writes or trains anything."""

from __future__ import annotations

import argparse


def at_least(low: float, kind=int, strict: bool = False):
    """An argparse type: a number of `kind` >= low (> low when strict)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if value < low or (strict and value == low) or value != value:
            raise argparse.ArgumentTypeError(f"{value} must be {'above' if strict else 'at least'} {low}")
        return value
    return parse
