"""A progress bar on a terminal, nothing per step in logs (the trainer logs one row per epoch)."""

from __future__ import annotations

import sys

__all__ = ["Progress"]


class Progress:
    """tqdm bar on a terminal; nothing per step otherwise (the epoch row is logged)."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, loss: float, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
