"""Progress of one .beton being written: a labelled bar on a terminal, one line in a log."""
from __future__ import annotations

import sys
import time
from typing import TextIO


class BetonProgress:
    """``label`` (e.g. ``train.beton``) names the file. When ``stream`` (stderr) is a terminal, a
    tqdm bar labelled with it; otherwise a single line on stdout once the file is complete."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None):
        from tqdm import tqdm

        stream = stream or sys.stderr
        self.label, self.total, self.started = label, total, time.monotonic()
        self.bar = tqdm(total=total, desc=label, unit="img", file=stream) if stream.isatty() else None

    def update(self, count: int) -> None:
        """``count`` samples are written so far."""
        if self.bar is not None and count > self.bar.n:
            self.bar.update(count - self.bar.n)

    def close(self, complete: bool) -> None:
        if self.bar is not None:
            self.bar.close()
        elif complete:
            print(f"{self.label}: {self.total} images written ({time.monotonic() - self.started:.1f} s)", flush=True)
