"""A compression entry that does nothing: the baseline of a sweep and the test of list composition."""
from __future__ import annotations

import pytorch_lightning as pl


class Noop(pl.Callback):
    """Leaves training untouched; ``compression=[noop]`` equals ``compression=[]``."""
