"""Which memory format a network may train in on this machine.

oneDNN's CPU backward of a 1x1 convolution with stride > 1 and fewer than 8 input channels in
channels_last corrupts the heap (abort, segfault or a hang) with torch 2.14.1 on AVX2 CPUs (seen
on this project's machines; 8 or more input channels, other kernels and the contiguous format are
fine). Such layers are the shortcuts of narrow ResNets (width 0.25) and of slimmed nets.
"""
from __future__ import annotations

from torch import nn


def cpu_channels_last_unsafe(net: nn.Module) -> list[str]:
    """Names of the convs whose channels_last backward crashes oneDNN on the CPU."""
    return [name for name, m in net.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1 and m.in_channels < 8]
