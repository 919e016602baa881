"""Energy per image of a network's forward pass: measured from RAPL when the machine exposes it, else estimated.

Measured: Linux powercap's Intel RAPL counters (``/sys/class/powercap/intel-rapl:*/energy_uj``,
micro-joule counters that wrap at ``max_energy_range_uj``; David et al. 2010, "RAPL: Memory Power
Estimation and Capping"), read around each timed forward pass of evaluation/cost.py.

Estimated: a per-operation model with the 45 nm figures of Horowitz 2014, "Computing's energy
problem (and what we can do about it)", ISSCC (the table Han et al. 2016, "Deep Compression",
argue from): every multiply-accumulate at the layer's arithmetic width, every stored parameter
read once from DRAM per image, every weighted layer's input and output moved through SRAM once.
The model in full is :func:`estimate_energy`'s docstring and docs/retention.md (Cost).
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from netcompress.evaluation.model_stats import count_flops, layer_flops

POWERCAP = "/sys/class/powercap"

# Horowitz 2014 (ISSCC, 45 nm, 0.9 V), energy per operation in picojoules.
HOROWITZ_45NM_PJ = {
    "fp32_mult": 3.7, "fp32_add": 0.9,
    "int8_mult": 0.2, "int8_add": 0.03,
    "int32_mult": 3.1, "int32_add": 0.1,
    "sram_read_32bit": 5.0,    # 8 KB SRAM, one 32-bit word
    "dram_read_32bit": 640.0,  # one 32-bit word
}
PJ = 1e-12  # joules per picojoule
INT8_MAX_BITS = 8  # a layer whose weights and inputs have at most this many bits runs int8 arithmetic


def mac_energy_pj(bits: int, table: dict[str, float] = HOROWITZ_45NM_PJ) -> float:
    """Energy of one multiply-accumulate: an int8 multiply with an int32 accumulate (as int8 kernels,
    fbgemm/qnnpack/onnxruntime, accumulate) when ``bits`` <= 8, else an fp32 multiply and add."""
    if bits <= INT8_MAX_BITS:
        return table["int8_mult"] + table["int32_add"]
    return table["fp32_mult"] + table["fp32_add"]


# ----- measured: RAPL through Linux powercap ------------------------------------------------------

@dataclass(frozen=True)
class RaplZone:
    name: str           # the zone's `name` file: package-0, dram, ...
    path: Path          # its folder
    max_range_uj: int   # the counter wraps to 0 after this value


class Rapl:
    """Sum of the RAPL energy counters of every CPU package plus every DRAM sub-zone (on servers DRAM
    is outside the package domain); core/uncore sub-zones are part of their package and ``psys`` (the
    whole platform, laptops) includes it, so both are left out to count nothing twice.

    ``Rapl.find(root)`` returns None when the counters are absent or unreadable (since Linux 5.10
    ``energy_uj`` is root-only); ``root`` is a folder argument so tests use a fake sysfs tree.
    """

    _TOP = re.compile(r"^intel-rapl:\d+$")
    _SUB = re.compile(r"^intel-rapl:\d+:\d+$")

    def __init__(self, zones: list[RaplZone]) -> None:
        if not zones:
            raise ValueError("Rapl needs at least one zone")
        self.zones = zones

    @classmethod
    def find(cls, root: str | Path = POWERCAP) -> "Rapl | None":
        root = Path(root)
        if not root.is_dir():
            return None
        zones = []
        for folder in sorted(root.iterdir()):
            try:
                name = (folder / "name").read_text().strip()
            except OSError:
                continue
            top = bool(cls._TOP.match(folder.name)) and name.startswith("package")
            dram = bool(cls._SUB.match(folder.name)) and name == "dram"
            if top or dram:
                try:
                    max_range = int((folder / "max_energy_range_uj").read_text())
                except (OSError, ValueError):
                    return None
                zones.append(RaplZone(name, folder, max_range))
        if not zones:
            return None
        rapl = cls(zones)
        try:
            rapl.read()
        except (OSError, ValueError):  # not readable by this user
            return None
        return rapl

    def read(self) -> tuple[int, ...]:
        """The zones' counters now (micro-joules)."""
        return tuple(int((zone.path / "energy_uj").read_text()) for zone in self.zones)

    def joules(self, start: tuple[int, ...], end: tuple[int, ...]) -> float:
        """Energy between two readings, each counter unwrapped once (a window shorter than one wrap:
        minutes even at hundreds of watts)."""
        total = 0
        for zone, a, b in zip(self.zones, start, end):
            total += b - a if b >= a else b + zone.max_range_uj - a
        return total * 1e-6


@dataclass
class EnergyMeter:
    """Wraps a runner (a no-argument callable, one forward pass of ``batch_size`` images) so every call
    adds its RAPL energy; ``joules_per_image`` is the mean over all calls."""

    rapl: Rapl
    batch_size: int
    joules: float = 0.0
    calls: int = 0

    def wrap(self, run: Callable[[], object]) -> Callable[[], object]:
        def metered():
            start = self.rapl.read()
            out = run()
            self.joules += self.rapl.joules(start, self.rapl.read())
            self.calls += 1
            return out
        return metered

    @property
    def joules_per_image(self) -> float:
        return self.joules / (self.calls * self.batch_size) if self.calls else math.nan


# ----- estimated: Horowitz 2014 per-operation model ------------------------------------------------

def quant_bits(module: nn.Module) -> tuple[int, int] | None:
    """(weight bits, input activation bits) of a layer that runs quantized, else None (float).

    Generic: netcompress's fake-quant layers (compression/fake_quant.py: int ``weight_bits`` /
    ``act_bits`` attributes, active while ``quant_enabled``) and torch.ao QAT modules (a
    ``weight_fake_quant`` with ``quant_min``/``quant_max``; activations then taken at the same width).
    """
    bits = getattr(module, "weight_bits", None)
    if isinstance(bits, int) and not isinstance(bits, bool):
        if not getattr(module, "quant_enabled", True):
            return None
        act = getattr(module, "act_bits", None)
        return bits, act if isinstance(act, int) and not isinstance(act, bool) else bits
    fake = getattr(module, "weight_fake_quant", None)
    if fake is not None and hasattr(fake, "quant_min") and hasattr(fake, "quant_max"):
        width = int(math.ceil(math.log2(int(fake.quant_max) - int(fake.quant_min) + 1)))
        return width, width
    return None


@dataclass
class EnergyEstimate:
    """One image's forward-pass energy by the model of :func:`estimate_energy`, in picojoules per part."""

    compute_pj: float
    dram_pj: float
    sram_pj: float
    macs: int
    int8_macs: int
    layers: dict[str, dict] = field(default_factory=dict)  # per weighted layer: macs, bits, activations

    @property
    def joules(self) -> float:
        return (self.compute_pj + self.dram_pj + self.sram_pj) * PJ


def _weighted_layers(net: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in net.named_modules()
            if isinstance(m._parameters.get("weight"), torch.Tensor)}


def estimate_energy(net: nn.Module, input_size: tuple[int, ...],
                    table: dict[str, float] = HOROWITZ_45NM_PJ) -> EnergyEstimate:
    """Energy of one image's forward pass (batch 1), Horowitz 2014's 45 nm figures (``table``, pJ):

    * compute: every multiply-accumulate of the layer, MACs = FLOPs / 2 of ``model_stats`` (dense:
      zero weights are multiplied too, as dense kernels do; a thinned net has fewer MACs because its
      layers are narrower), at ``mac_energy_pj(bits)``: int8 multiply + int32 add (0.2 + 0.1 pJ) for a
      layer whose weights and inputs have <= 8 bits, else fp32 multiply + add (3.7 + 0.9 pJ). MACs
      outside weighted layers (e.g. attention's matmuls) count as fp32.
    * DRAM: every stored parameter (zeros included: dense storage) read once per image at its width,
      bits / 32 x 640 pJ: a quantized layer's weight at its weight bits, everything else (biases,
      norms) at 32 bits. No reuse across a batch, so this is the batch-1 figure.
    * SRAM: every weighted layer (one doing MACs) reads its input and writes its output once, at the
      layer's activation bits (32 unless quantized), bits / 32 x 5 pJ per element (a write costs as
      much as a read); norms and activations are taken as fused into the layer before them.

    Bit widths come from :func:`quant_bits`. Widths below 8 bits cost as int8 arithmetic (Horowitz
    has no smaller unit) but are stored at their own width.
    """
    model = copy.deepcopy(net).cpu().eval()
    flops = layer_flops(model, input_size)
    total_macs = count_flops(model, input_size) // 2
    weighted = _weighted_layers(model)
    # MACs a layer does itself: its FLOPs less those of the weighted layers inside it (if any); the
    # counter does not name the root, so a net that is one layer (a bare nn.Linear) gets the total
    own_macs = {}
    for name in weighted:
        if not name:
            own_macs[name] = max(2 * total_macs - sum(flops.get(o, 0) for o in weighted if o), 0) // 2
            continue
        inner = sum(flops.get(other, 0) for other in weighted if other.startswith(name + "."))
        own_macs[name] = max(flops.get(name, 0) - inner, 0) // 2
    activations: dict[str, int] = {}
    handles = []
    for name, module in weighted.items():
        if own_macs[name] == 0:
            continue
        def hook(m, inputs, output, name=name):
            moved = sum(t.numel() for t in inputs if isinstance(t, torch.Tensor))
            moved += output.numel() if isinstance(output, torch.Tensor) else 0
            activations[name] = activations.get(name, 0) + moved
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size))
    finally:
        for handle in handles:
            handle.remove()

    compute = sram = dram = 0.0
    layer_macs = int8_macs = 0
    layers = {}
    stored_bits: dict[int, int] = {}  # id(parameter) -> bits it is stored at
    for name, module in weighted.items():
        bits = quant_bits(module)
        if bits is not None:
            stored_bits[id(module.weight)] = bits[0]
        macs = own_macs[name]
        if macs == 0:
            continue
        arith = max(bits) if bits is not None else 32
        act_bits = bits[1] if bits is not None else 32
        compute += macs * mac_energy_pj(arith, table)
        sram += activations.get(name, 0) * act_bits / 32 * table["sram_read_32bit"]
        layer_macs += macs
        int8_macs += macs if arith <= INT8_MAX_BITS else 0
        layers[name] = {"macs": macs, "arith_bits": arith, "act_bits": act_bits,
                        "activations": activations.get(name, 0)}
    compute += max(total_macs - layer_macs, 0) * mac_energy_pj(32, table)
    for p in model.parameters():  # shared parameters once
        dram += p.numel() * stored_bits.get(id(p), 32) / 32 * table["dram_read_32bit"]
    return EnergyEstimate(compute, dram, sram, total_macs, int8_macs, layers)


__all__ = ["HOROWITZ_45NM_PJ", "POWERCAP", "mac_energy_pj", "Rapl", "RaplZone", "EnergyMeter", "quant_bits",
           "EnergyEstimate", "estimate_energy"]
