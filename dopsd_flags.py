# Copyright 2026 The dopsd authors. Licensed under the Apache License, Version 2.0.
"""Range checks for the scripts' flags, as argparse `type=` functions, and the parser that reports them.

Every script builds its command line from these, so a bad value is refused while the arguments are parsed: before
anything is loaded or written, with one `error:` line that names the flag, the value and what is accepted. Only the
standard library is imported here (caption_dopsd.py answers bad input before torch is imported).
"""

from __future__ import annotations

import argparse
import math
import re
import sys


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, like the scripts' own input errors: argparse's usage block for
    sixty flags would bury the line that says what is wrong (--help still prints it)."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _bounds(minimum, maximum, above: bool, below: bool) -> str:
    def show(bound):
        return f"{bound:g}" if isinstance(bound, float) else str(bound)

    parts = []
    if minimum is not None:
        parts.append(f"{'above' if above else 'at least'} {show(minimum)}")
    if maximum is not None:
        parts.append(f"{'below' if below else 'at most'} {show(maximum)}")
    return " and ".join(parts)


def integer(minimum: int | None = None, maximum: int | None = None, multiple_of: int | None = None):
    """A whole number in [minimum, maximum] (a multiple of `multiple_of` if given)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {_bounds(minimum, maximum, False, False)}, got {value}")
        if multiple_of and value % multiple_of:
            nearest = max(multiple_of, round(value / multiple_of) * multiple_of)
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple_of}, got {value}: use e.g. {nearest}")
        return value

    parse.__name__ = "integer"
    return parse


def number(minimum: float | None = None, maximum: float | None = None, *, above: bool = False, below: bool = False):
    """A finite number in the range (NaN and infinity are refused: every float flag means a finite one). `above` and
    `below` make the bounds exclusive."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        low = minimum is not None and (value <= minimum if above else value < minimum)
        high = maximum is not None and (value >= maximum if below else value > maximum)
        if low or high:
            raise argparse.ArgumentTypeError(f"must be {_bounds(minimum, maximum, above, below)}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


positive_int = integer(1)
non_negative_int = integer(0)
# numpy (seeded by accelerate's set_seed) takes seeds below 2**32.
seed = integer(0, 2**32 - 1)
positive_number = number(0, above=True)
non_negative_number = number(0)
fraction = number(0, 1)  # [0, 1]
open_fraction = number(0, 1, below=True)  # [0, 1): Adam's betas, dropout


def text(value: str) -> str:
    """A string with something in it: an empty or blank prompt, name or path is a mistake, never a choice (an empty
    path would mean the current folder)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("is empty: pass a value or leave the flag out")
    if "\0" in value:
        raise argparse.ArgumentTypeError("holds a NUL character: retype the value")
    return value


def name_list(value: str) -> str:
    """A comma-separated list of names (columns, module suffixes), each non-empty; returned as given."""
    names = [part.strip() for part in value.split(",")]
    if not any(names):
        raise argparse.ArgumentTypeError("names nothing: pass comma-separated names, e.g. a,b")
    if not all(names):
        raise argparse.ArgumentTypeError(f"{value!r} has an empty name between commas: remove the extra comma")
    if twice := next((n for i, n in enumerate(names) if n in names[:i]), None):
        raise argparse.ArgumentTypeError(f"{value!r} lists {twice!r} twice: name each once")
    return value


def seed_list(value: str) -> list[int]:
    """Comma-separated seeds, e.g. 0,1,2."""
    parts = [part.strip() for part in value.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("is empty: pass e.g. 0,1")
    seeds = [seed(part) for part in parts]
    if len(set(seeds)) < len(seeds):  # a repeated seed is the same images again, under one file name
        raise argparse.ArgumentTypeError(f"{value!r} repeats a seed: list each once")
    return seeds


_BUCKET = re.compile(r"^\s*(\d+)\s*,\s*(\d+)\s*$")


def buckets(value: str) -> str:
    """'h,w;h,w;...' with positive whole sizes."""
    pairs = [pair for pair in value.split(";") if pair.strip()]
    if not pairs:
        raise argparse.ArgumentTypeError("is empty: pass buckets as 'h,w;h,w', e.g. 1024,1024;896,1152")
    for pair in pairs:
        match = _BUCKET.match(pair)
        if not match or int(match[1]) < 1 or int(match[2]) < 1:
            raise argparse.ArgumentTypeError(f"{pair.strip()!r} is not 'height,width' in positive whole pixels, e.g. 896,1152")
    return value


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]B)\s*$", re.IGNORECASE)
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # huggingface_hub's parse_size_to_int


def shard_size(value: str) -> int | str:
    """What safetensors sharding takes: a whole number of bytes, or a size with KB, MB, GB or TB, e.g. 5GB."""
    if value.strip().isdigit() and int(value) > 0:
        return int(value)
    match = _SIZE.match(value)
    if not match or float(match[1]) * _UNITS[match[2].upper()] < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a size: pass e.g. 5GB, 500MB or a number of bytes")
    return value.strip()
