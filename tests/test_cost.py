"""The cost evaluator (evaluation/cost.py) and energy per image (evaluation/energy.py): counts and
parent/child ratios against hand counts, model-file bytes against save_model and run.py's size_bytes,
latency keys and threads (no timing assertions), RAPL reading on a fake sysfs tree (wraparound
included), the Horowitz 2014 estimate against a hand computation at 32 and 8 bits, and end to end
from config with and without a parent."""
from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TINY, compose_config
from netcompress.evaluation import energy as energy_mod
from netcompress.evaluation.cost import Cost, model_name_of, saved_size_bytes
from netcompress.evaluation.energy import EnergyMeter, Rapl, estimate_energy, quant_bits
from netcompress.models.serialization import save_model

INPUT = (3, 6, 6)
FAST = dict(batch_sizes=[1, 4], repeats_b1=2, repeats_b64=1, warmup=0, threads=1)


class Data:
    input_size = INPUT
    num_classes = 4


def tiny_net(filters: int = 8) -> nn.Module:
    """conv3x3 (no bias) -> ReLU -> global pool -> Linear(filters, 4)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, filters, 3, padding=1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(filters, 4))


def hand_params(f: int) -> int:
    return 3 * f * 9 + f * 4 + 4


def hand_flops(f: int) -> int:
    """2 per multiply-add: conv 2 x (f x 6 x 6 outputs) x 27, linear 2 x f x 4 (pool/ReLU: none)."""
    return 2 * f * 36 * 27 + 2 * f * 4


# ----- counts and ratios -------------------------------------------------------------------------

def test_half_the_filters_gives_hand_counted_ratios_and_speedup_keys():
    parent, child = tiny_net(8), tiny_net(4)
    threads_before = torch.get_num_threads()
    figures = Cost(**FAST)(child, Data(), parent)
    assert figures["cost/params"] == hand_params(4) == figures["cost/nonzero_params"]
    assert figures["cost/flops"] == hand_flops(4)
    assert figures["cost/params_ratio"] == hand_params(8) / hand_params(4)
    assert figures["cost/nonzero_params_ratio"] == hand_params(8) / hand_params(4)
    assert figures["cost/flops_ratio"] == hand_flops(8) / hand_flops(4) == 2.0
    for b in (1, 4):
        for key in (f"cost/latency_ms_b{b}", f"cost/parent_latency_ms_b{b}", f"cost/speedup_b{b}"):
            assert math.isfinite(figures[key]) and figures[key] > 0
        assert figures[f"cost/speedup_b{b}"] == (figures[f"cost/parent_latency_ms_b{b}"]
                                                 / figures[f"cost/latency_ms_b{b}"])
    assert figures["cost/threads"] == 1 and torch.get_num_threads() == threads_before  # set, then restored
    assert figures["cost/energy_source"] == "estimated"  # no powercap on the default root in CI
    json.dumps(figures)  # JSON-serialisable as they are


def test_zeroed_weights_change_only_the_nonzero_ratio_and_threads_default_to_torchs():
    parent = tiny_net(8)
    child = copy.deepcopy(parent)
    with torch.no_grad():
        child[0].weight[:4] = 0  # half the conv filters: 4 x 27 weights
    figures = Cost(**{**FAST, "threads": None})(child, Data(), parent)
    assert figures["cost/nonzero_params"] == hand_params(8) - 4 * 27
    assert figures["cost/nonzero_params_ratio"] == hand_params(8) / (hand_params(8) - 4 * 27)
    assert figures["cost/params_ratio"] == 1.0 and figures["cost/flops_ratio"] == 1.0  # dense counts
    assert figures["cost/threads"] == torch.get_num_threads()


def test_size_is_the_save_model_file_and_the_ratio_is_parent_over_child(tmp_path):
    parent, child = tiny_net(8), tiny_net(4)
    figures = Cost(**FAST)(child, Data(), parent)
    sizes = {}
    for name, net in (("parent", parent), ("child", child)):
        path = tmp_path / name / "model.pt"  # torch.save names the zip's records after the file: as run.py
        returned = save_model(net, path, model_name_of(net), Data.num_classes)
        sizes[name] = path.stat().st_size
        assert returned == sizes[name] == saved_size_bytes(net, Data.num_classes)
    assert figures["cost/size_bytes"] == sizes["child"]
    assert figures["cost/size_ratio"] == sizes["parent"] / sizes["child"] > 1


def test_the_nets_and_the_global_rng_are_left_alone_and_results_repeat():
    parent, child = tiny_net(8).train(), tiny_net(4).train()
    before = copy.deepcopy(child.state_dict())
    rng = torch.get_rng_state()
    first = Cost(**FAST)(child, Data(), parent)
    assert torch.equal(torch.get_rng_state(), rng)
    assert child.training and parent.training
    assert all(torch.equal(before[k], v) for k, v in child.state_dict().items())
    second = Cost(**FAST)(child, Data(), parent)
    timed = ("latency", "speedup")
    assert {k: v for k, v in first.items() if not any(t in k for t in timed)} == \
        {k: v for k, v in second.items() if not any(t in k for t in timed)}


def test_without_a_parent_only_absolute_figures_and_one_info_line(caplog):
    caplog.set_level(logging.INFO, logger="netcompress.evaluation.cost")
    figures = Cost(**FAST)(tiny_net(4), Data(), None)
    assert not [k for k in figures if "ratio" in k or "parent" in k or "speedup" in k]
    for key in ("cost/params", "cost/nonzero_params", "cost/size_bytes", "cost/flops", "cost/latency_ms_b1",
                "cost/latency_ms_b4", "cost/threads", "cost/energy_j_per_image", "cost/energy_source"):
        assert key in figures
    lines = [r for r in caplog.records if r.name == "netcompress.evaluation.cost"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO and "no parent net" in lines[0].getMessage()


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_sizes": []}, r"evaluators.cost.batch_sizes.*got \[\]"),
    ({"batch_sizes": [1, 0]}, r"evaluators.cost.batch_sizes.*>= 1; got 0"),
    ({"batch_sizes": [1, 1]}, r"batch_sizes.*twice"),
    ({"batch_sizes": "1,64"}, r"batch_sizes.*list"),
    ({"repeats_b1": 0}, r"evaluators.cost.repeats_b1.*>= 1; got 0"),
    ({"repeats_b64": 2.5}, r"evaluators.cost.repeats_b64.*got 2.5"),
    ({"warmup": -1}, r"evaluators.cost.warmup.*>= 0; got -1"),
    ({"threads": 0}, r"evaluators.cost.threads.*got 0"),
    ({"energy": "measure"}, r"evaluators.cost.energy.*auto, estimated; got 'measure'"),
])
def test_bad_arguments_name_the_key_the_value_and_what_is_valid(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Cost(**kwargs)


# ----- RAPL -------------------------------------------------------------------------------------

def _zone(root: Path, folder: str, name: str, energy: int | None, max_range: int = 1_000_000) -> Path:
    path = root / folder
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "max_energy_range_uj").write_text(f"{max_range}\n")
    if energy is not None:
        (path / "energy_uj").write_text(f"{energy}\n")
    return path


def fake_powercap(root: Path) -> dict[str, Path]:
    """Two packages with core and dram sub-zones, a psys zone and an mmio duplicate (the last three
    overlap the packages and must not be counted)."""
    return {
        "pkg0": _zone(root, "intel-rapl:0", "package-0", 999_000),
        "core0": _zone(root, "intel-rapl:0:0", "core", 10),
        "dram0": _zone(root, "intel-rapl:0:1", "dram", 100, max_range=500_000),
        "pkg1": _zone(root, "intel-rapl:1", "package-1", 2_000),
        "psys": _zone(root, "intel-rapl:2", "psys", 0),
        "mmio": _zone(root, "intel-rapl-mmio:0", "package-0", 0),
    }


def test_rapl_reads_packages_and_dram_and_unwraps_a_wrapped_counter(tmp_path):
    zones = fake_powercap(tmp_path)
    rapl = Rapl.find(tmp_path)
    assert [z.name for z in rapl.zones] == ["package-0", "dram", "package-1"]
    start = rapl.read()
    assert start == (999_000, 100, 2_000)
    (zones["pkg0"] / "energy_uj").write_text("500\n")   # wrapped: 1_000_000 - 999_000 + 500 = 1500 uJ
    (zones["dram0"] / "energy_uj").write_text("300\n")  # 200 uJ
    (zones["pkg1"] / "energy_uj").write_text("5000\n")  # 3000 uJ
    (zones["core0"] / "energy_uj").write_text("999\n")  # inside package-0: ignored
    assert rapl.joules(start, rapl.read()) == pytest.approx((1500 + 200 + 3000) * 1e-6, rel=1e-12)


def test_rapl_is_absent_when_the_folder_or_the_counters_are_missing_or_unreadable(tmp_path):
    assert Rapl.find(tmp_path / "nowhere") is None
    assert Rapl.find(tmp_path) is None  # no zones
    _zone(tmp_path, "intel-rapl:0", "package-0", None)  # energy_uj missing (as for a non-root user)
    assert Rapl.find(tmp_path) is None


class CountingRapl(Rapl):
    """Every read advances the one counter by 1000 uJ, wrapping at 2500."""

    def __init__(self):
        super().__init__([energy_mod.RaplZone("package-0", Path("."), 2_500)])
        self.value = 0

    def read(self):
        self.value = (self.value + 1_000) % 2_500
        return (self.value,)


def test_energy_meter_adds_each_calls_energy_and_divides_by_the_images():
    meter = EnergyMeter(CountingRapl(), batch_size=4)
    run = meter.wrap(lambda: "out")
    assert [run() for _ in range(3)] == ["out"] * 3  # reads 1000->2000, 500(wrapped)->1500, 0(wrapped)->1000
    assert meter.calls == 3 and meter.joules == pytest.approx(3 * 1000e-6)
    assert meter.joules_per_image == pytest.approx(3 * 1000e-6 / 12)


def test_cost_reports_measured_energy_when_rapl_is_readable(tmp_path):
    fake_powercap(tmp_path)  # static counters: every forward pass measures 0 J
    figures = Cost(**FAST, rapl_root=str(tmp_path))(tiny_net(4), Data(), tiny_net(8))
    assert figures["cost/energy_source"] == "measured"
    assert figures["cost/energy_j_per_image"] == 0.0 == figures["cost/parent_energy_j_per_image"]


# ----- Horowitz 2014 estimate -------------------------------------------------------------------

FP32_MAC, INT8_MAC, DRAM, SRAM = 3.7 + 0.9, 0.2 + 0.1, 640.0, 5.0  # pJ; int8 multiply + int32 add


def test_estimate_of_one_linear_layer_by_hand():
    net = nn.Linear(4, 3)
    e = estimate_energy(net, (4,))
    # 12 MACs; 15 parameters from DRAM; input 4 + output 3 through SRAM
    assert e.macs == 12
    assert e.joules == pytest.approx((12 * FP32_MAC + 15 * DRAM + 7 * SRAM) * 1e-12, rel=1e-12)


def conv_linear_net() -> nn.Module:
    """Conv2d(1, 2, 3, pad 1) on 1x4x4 -> ReLU -> Flatten -> Linear(32, 3)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))


def quantize(layer: nn.Module, bits: int) -> nn.Module:
    from netcompress.compression import fake_quant as fq

    layer = fq.wrap_layer(layer, bits, bits, "minmax", 0.01)
    layer.act_min.fill_(-1.0)
    layer.act_max.fill_(1.0)
    layer.quant_enabled = True
    return layer


# conv: 2 x 16 outputs x 9 = 288 MACs, 18 weights + 2 biases, 16 in + 32 out; linear: 96 MACs, 96 + 3, 32 in + 3 out
CONV = dict(macs=288, weights=18, biases=2, acts=16 + 32)
LIN = dict(macs=96, weights=96, biases=3, acts=32 + 3)


def _layer_pj(layer: dict, bits: int) -> float:
    mac = INT8_MAC if bits <= 8 else FP32_MAC
    return (layer["macs"] * mac + layer["weights"] * bits / 32 * DRAM + layer["biases"] * DRAM
            + layer["acts"] * bits / 32 * SRAM)


@pytest.mark.parametrize("conv_bits, linear_bits", [(32, 32), (8, 8), (8, 32), (4, 8)])
def test_estimate_of_a_conv_linear_net_by_hand_at_32_and_8_bits(conv_bits, linear_bits):
    net = conv_linear_net()
    if conv_bits < 32:
        net[0] = quantize(net[0], conv_bits)
    if linear_bits < 32:
        net[3] = quantize(net[3], linear_bits)
    e = estimate_energy(net, (1, 4, 4))
    expected = _layer_pj(CONV, conv_bits) + _layer_pj(LIN, linear_bits)
    assert e.macs == 288 + 96
    assert e.int8_macs == (288 if conv_bits <= 8 else 0) + (96 if linear_bits <= 8 else 0)
    assert e.joules == pytest.approx(expected * 1e-12, rel=1e-12)


def test_quant_bits_detects_fake_quant_layers_generically():
    from netcompress.compression import fake_quant as fq

    layer = fq.wrap_layer(nn.Linear(2, 2), 8, 6, "minmax", 0.01)
    assert quant_bits(layer) is None  # fake quantization off: a float layer
    layer.quant_enabled = True
    assert quant_bits(layer) == (8, 6)
    ao_like = nn.Linear(2, 2)
    ao_like.weight_fake_quant = type("FQ", (), {"quant_min": -128, "quant_max": 127})()  # torch.ao QAT modules
    assert quant_bits(ao_like) == (8, 8)
    assert quant_bits(nn.Conv2d(1, 1, 1)) is None


def test_a_thinner_child_costs_less_estimated_energy_than_its_parent():
    figures = Cost(**FAST)(tiny_net(4), Data(), tiny_net(8))
    assert 0 < figures["cost/energy_j_per_image"] < figures["cost/parent_energy_j_per_image"]
    assert figures["cost/energy_j_per_image"] == estimate_energy(tiny_net(4), INPUT).joules


# ----- end to end from config -------------------------------------------------------------------

E2E = ["evaluation=[cost]", "evaluators.cost.repeats_b1=2", "evaluators.cost.repeats_b64=1",
       "evaluators.cost.warmup=0", "evaluators.cost.rapl_root=/nonexistent"]


@pytest.mark.slow  # two tiny runs and batch-64 timing: ~25 s on a loaded 2-core machine
def test_a_run_from_init_from_reports_cost_figures_matching_run_py_and_its_parent(tiny_config, tmp_path):
    from netcompress.run import run

    dense = run(compose_config(TINY, tmp_path / "dense"))
    assert dense["status"] == "ok"
    cfg = tiny_config(f"init_from={tmp_path / 'dense' / 'model.pt'}", *E2E)
    run(cfg)
    saved = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert saved["status"] == "ok"
    # the evaluator's counts are run.py's (same save_model, same counters)
    assert saved["cost/size_bytes"] == saved["size_bytes"]
    assert saved["cost/params"] == saved["params_total"] and saved["cost/nonzero_params"] == saved["params_nonzero"]
    assert saved["cost/flops"] == saved["flops"]
    # the parent is the dense run's net: its model.pt has the same bytes; same architecture, ratio 1
    assert saved["cost/size_ratio"] == dense["size_bytes"] / saved["size_bytes"]
    assert saved["cost/params_ratio"] == 1.0 and saved["cost/flops_ratio"] == 1.0
    for key in ("cost/speedup_b1", "cost/speedup_b64", "cost/parent_latency_ms_b64", "cost/energy_j_per_image",
                "cost/parent_energy_j_per_image"):
        assert saved[key] > 0
    assert saved["cost/energy_source"] == "estimated" and saved["cost/threads"] >= 1


def test_a_run_without_a_parent_has_no_ratio_keys(tiny_config):
    from netcompress.run import run

    cfg = tiny_config(*E2E, "evaluators.cost.batch_sizes=[1]")
    results = run(cfg)
    assert results["status"] == "ok"
    cost = {k for k in results if k.startswith("cost/")}
    assert cost == {"cost/params", "cost/nonzero_params", "cost/size_bytes", "cost/flops", "cost/latency_ms_b1",
                    "cost/threads", "cost/energy_j_per_image", "cost/energy_source"}
    assert results["cost/size_bytes"] == results["size_bytes"]


def test_the_config_builds_the_evaluator_with_the_code_defaults(tmp_path):
    import inspect

    from netcompress.evaluation.evaluators import build_evaluators

    cfg = compose_config([*TINY, "evaluation=[cost]", "seed=3"], tmp_path / "run")
    (cost,) = build_evaluators(cfg.evaluators)
    assert isinstance(cost, Cost) and cost.seed == 3  # ${seed}
    defaults = {k: p.default for k, p in inspect.signature(Cost).parameters.items() if k != "seed"}
    assert {k: getattr(cost, k) for k in defaults} == {**defaults, "batch_sizes": list(defaults["batch_sizes"])}


def test_eager_runner_times_a_channels_last_net_in_the_layout_of_its_parent():
    """A net trained in channels_last (the module's default) is timed contiguous, like its parent loaded from a
    file: otherwise every layer converts layouts and the child looks slower than it is."""
    from torch import nn

    from netcompress.evaluation.model_stats import eager_runner

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).to(memory_format=torch.channels_last)
    run = eager_runner(net, (3, 16, 16))
    cells = [c.cell_contents for c in run.__closure__]
    model = next(c for c in cells if isinstance(c, nn.Module))
    x = next(c for c in cells if isinstance(c, torch.Tensor))
    assert all(m.weight.is_contiguous() for m in model if isinstance(m, nn.Conv2d)) and x.is_contiguous()
    assert not net[0].weight.is_contiguous()  # the caller's net is untouched
    assert run().shape == (1, 8, 12, 12)
