"""Progress bars for transfers (import, pull, push): one tqdm bar per blob, on stderr,
only on a terminal.

tqdm is the light choice among the bar libraries: pure Python, no dependencies,
several bars at once (each takes its own line), and it turns itself off when
stderr is not a terminal, so logs and pipes stay quiet.
"""

from __future__ import annotations

import sys


class Bar:
    def __init__(self, bars: Bars, desc: str, total: int | None) -> None:
        from tqdm import tqdm  # on first use: the image commands' parsers load this module

        self._t = tqdm(
            total=total,
            desc=desc,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            leave=True,
            disable=not bars.enabled,
            dynamic_ncols=True,
            mininterval=0.2,
        )

    def update(self, n: int) -> None:
        self._t.update(n)

    def done(self, note: str | None = None) -> None:
        if note:
            self._t.set_postfix_str(note, refresh=False)
        self._t.close()


class Bars:
    """`enabled=None`: bars when stderr is a terminal."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def bar(self, desc: str, total: int | None) -> Bar:
        return Bar(self, desc, total)

    def note(self, text: str) -> None:
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stderr)
