"""Size and cost of a network: parameter counts, FLOPs, CPU latency (the figures every result reports)."""
from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(net: nn.Module) -> tuple[int, int]:
    """(total, non-zero) parameter counts; non-zero is what unstructured pruning shrinks."""
    total = nonzero = 0
    for p in net.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return total, nonzero


def _cpu_eval_copy(net: nn.Module) -> nn.Module:
    return copy.deepcopy(net).cpu().eval()


def count_flops(net: nn.Module, input_size: tuple[int, int, int]) -> int:
    """FLOPs of one image's forward pass (torch.utils.flop_counter: 2 per multiply-add)."""
    model = _cpu_eval_copy(net)
    x = torch.zeros(1, *input_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


def measure_latency_ms(net: nn.Module, input_size: tuple[int, int, int], batch_size: int = 1,
                       warmup: int = 5, repeats: int = 30,
                       memory_format: torch.memory_format = torch.contiguous_format) -> float:
    """Median wall time (ms) of one CPU forward pass in inference mode."""
    model = _cpu_eval_copy(net).to(memory_format=memory_format)
    x = torch.randn(batch_size, *input_size).contiguous(memory_format=memory_format)
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)
