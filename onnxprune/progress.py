"""Progress bars for loops over data or groups: tqdm on a terminal, silent otherwise."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, quiet: bool = False, **kwargs) -> Iterable[T]:
    """Wrap `items` in a tqdm bar on stderr unless `quiet`, stderr is not a TTY or tqdm is missing."""
    if quiet or not sys.stderr.isatty():
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, leave=False, file=sys.stderr, **kwargs)
