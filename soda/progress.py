"""Progress of long loops on stderr: a tqdm bar on a terminal (when tqdm, of the data extra, is
installed); in a log file (stderr not a terminal), or without tqdm, one plain line every
``interval`` seconds, so that ``make demo > log 2>&1`` stays readable instead of filling with
carriage-return updates."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from soda.extras import installed

INTERVAL_S = 30.0
Item = TypeVar("Item")


class Progress(Iterable[Item]):
    """Iterate over ``iterable`` and show how far it got, under ``description``.

    ``set_postfix(text)`` changes the text shown after the count (e.g. the latest loss); nothing
    is shown when ``enabled`` is False (e.g. on every data-parallel rank but rank 0).
    """

    def __init__(self, iterable: Iterable[Item], description: str, enabled: bool = True, interval: float = INTERVAL_S):
        self.iterable, self.description, self.interval = iterable, description, interval
        self.total = len(iterable) if hasattr(iterable, "__len__") else None
        self.bar = None
        if enabled and sys.stderr.isatty() and installed("tqdm"):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=description, leave=False)
        self.lines = enabled and self.bar is None
        self.postfix = ""

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def __iter__(self) -> Iterator[Item]:
        start = last = time.monotonic()
        count = 0
        for count, item in enumerate(self.iterable, start=1):
            yield item
            if self.bar is not None:
                self.bar.update()
            elif self.lines and (now := time.monotonic()) - last >= self.interval:
                last = now
                of_total = f"/{self.total}" if self.total is not None else ""
                rate = count / (now - start)
                postfix = f", {self.postfix}" if self.postfix else ""
                print(f"{self.description}: {count}{of_total} ({rate:.2f}/s{postfix})", file=sys.stderr, flush=True)
        if self.bar is not None:
            self.bar.close()
