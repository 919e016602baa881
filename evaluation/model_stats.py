"""Size and cost of a network: parameter counts, FLOPs, CPU latency (the figures every result reports)."""
from __future__ import annotations

import copy
import statistics
import time
from typing import Callable, Mapping

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


def _flop_counter(net: nn.Module, input_size: tuple[int, ...]) -> FlopCounterMode:
    """A FlopCounterMode that has seen one image's forward pass of an eval copy of ``net`` on the CPU."""
    model = _cpu_eval_copy(net)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *input_size))
    return counter


def count_flops(net: nn.Module, input_size: tuple[int, int, int]) -> int:
    """FLOPs of one image's forward pass (torch.utils.flop_counter: 2 per multiply-add)."""
    return int(_flop_counter(net, input_size).get_total_flops())


def layer_flops(net: nn.Module, input_size: tuple[int, int, int]) -> dict[str, int]:
    """{module name: FLOPs of its forward pass for one image} of every submodule that does any (a
    container counts its children's); the same counter as :func:`count_flops`, so a net's layers add up
    to its total. Dense FLOPs: pruned (zero) weights are counted (see protocols/retrain_init.py's
    ``effective_flops`` for the sparse count)."""
    counts = _flop_counter(net, input_size).get_flop_counts()
    root = type(net).__name__ + "."  # the counter names modules '<RootClass>.<name>'
    return {name[len(root):]: int(sum(ops.values())) for name, ops in counts.items()
            if name.startswith(root) and sum(ops.values())}


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


def eager_runner(net: nn.Module, input_size: tuple[int, ...], batch_size: int = 1,
                 memory_format: torch.memory_format = torch.contiguous_format) -> Callable[[], object]:
    """One CPU inference-mode forward pass of (an eval copy of) ``net`` per call, for :func:`interleaved_latency_ms`.

    The copy and the input are put in ``memory_format`` (contiguous by default, as ``measure_latency_ms``):
    a net trained in channels_last (the module's default) would otherwise be timed in another layout
    than its parent loaded from a file, converting at every layer: not like with like."""
    model = _cpu_eval_copy(net).to(memory_format=memory_format)
    x = torch.randn(batch_size, *input_size)
    x = x.contiguous(memory_format=memory_format) if x.dim() == 4 else x

    def run():
        with torch.inference_mode():
            return model(x)
    return run


def interleaved_latency_ms(runners: Mapping[str, Callable[[], object]], warmup: int = 5,
                           repeats: int = 30) -> dict[str, float]:
    """{name: median wall time (ms)} of each runner, timed alternately in one window.

    Each round runs every runner once (order reversed every other round), so a change of machine
    load hits all of them alike and their ratio is a fair comparison; timing them one after the
    other, minutes apart, is not (a loaded machine once showed a 170x "speed-up" that way).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"interleaved_latency_ms: repeats must be >= 1 and warmup >= 0; got {repeats}, {warmup}")
    order = list(runners.items())
    for _ in range(warmup):
        for _, run in order:
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(repeats):
        for name, run in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(t) for name, t in times.items()}
