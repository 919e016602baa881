"""report.py on a folder of small fake results: means, sample std, n, failed jobs listed, PNGs written."""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from netcompress.evaluation.results import write_results
from netcompress.report import ReportOnMultirun
from netcompress.report import DENSE_LABEL, aggregate, collect, make_report
from netcompress.report import main as report_main

ACC = {  # (method, sparsity) -> test acc1 of seeds 0, 1, 2
    ("rewind k=0", 0.2): [0.90, 0.92, 0.94],
    ("rewind k=0", 0.488): [0.85, 0.86, 0.90],
    ("reinit (Scratch-E)", 0.2): [0.88, 0.89, 0.87],
    ("reinit (Scratch-E)", 0.488): [0.80, 0.70, 0.75],
}
DENSE = {0: 0.91, 1: 0.93, 2: 0.92}


def fake_job(folder: Path, label: str, sparsity: float, seed: int, acc: float | None, status: str = "ok") -> None:
    (folder / ".hydra").mkdir(parents=True)
    write_results(folder, {
        "status": status, "error": None if status == "ok" else "RuntimeError: CUDA out of memory", "seed": seed,
        "model_name": "resnet20_cifar", "test/acc1": acc, "flops": 1000, "lottery/method": label.split()[0],
        "lottery/label": label, "lottery/sparsity": sparsity, "lottery/round": 1,
        "lottery/effective_flops": 1000 * (1 - sparsity), "lottery/dense_flops": 1000,
        "lottery/dense_test_acc1": DENSE[seed], "lottery/dense_key": f"dense-{seed}",
        # whole-net figures: structured pruning of some layers keeps more params than those layers' fraction
        "params_nonzero": 800 * (1 - sparsity) + 200, "lottery/dense_params": 1000,
        "lottery/flops_fraction": 1 - sparsity,
        "lottery/cumulative_steps": 100 * (seed + 1) + round(1000 * sparsity),  # compute: differs per seed
        "config": {"optimizer": {"lr": 0.01}}})


@pytest.fixture
def sweep(tmp_path):
    n = 0
    for (label, sparsity), accs in ACC.items():
        for seed, acc in enumerate(accs):
            fake_job(tmp_path / str(n), label, sparsity, seed, acc)
            n += 1
    fake_job(tmp_path / str(n), "rewind k=0", 0.738, 0, None, status="failed")
    (tmp_path / str(n + 1) / ".hydra").mkdir(parents=True)  # a killed job: no results.json at all
    return tmp_path


def reference(values):
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_report_means_std_and_failed_jobs(sweep):
    written = make_report(sweep, title="fake")
    rows = {(r["method"], round(float(r["pruned_layer_sparsity"]), 4)): r for r in csv.DictReader((sweep / "report.csv").open())}
    assert len(rows) == len(ACC) + 1
    for (label, sparsity), accs in ACC.items():
        row = rows[(label, sparsity)]
        mean, std = reference(accs)
        assert int(row["n"]) == 3
        assert float(row["test_acc1_mean"]) == pytest.approx(mean, abs=1e-6)
        assert float(row["test_acc1_std"]) == pytest.approx(std, abs=1e-6)
        assert float(row["pruned_layer_remaining"]) == pytest.approx(1 - sparsity, abs=1e-4)
    dense = rows[(DENSE_LABEL, 0.0)]
    assert int(dense["n"]) == 3 and float(dense["test_acc1_mean"]) == pytest.approx(reference(list(DENSE.values()))[0])
    md = (sweep / "report.md").read_text()
    assert "Failed jobs: 2" in md and "CUDA out of memory" in md and "no results.json" in md
    # pruned layers keep 51.2%, the whole net 0.8 * 51.2% + 20% = 61.0% of its parameters
    assert "| rewind k=0 | 51.2% | 61.0% | 51.2% | 3 | 87.00 +- 2.65 | 6.57 |" in md  # t(0.975, 2) = 4.303
    assert float(rows[("rewind k=0", 0.488)]["params_fraction"]) == pytest.approx(0.8 * 0.512 + 0.2)
    for path in written:
        assert path.is_file() and path.stat().st_size > 0
    for png in ("acc_vs_remaining.png", "acc_vs_flops.png"):
        assert (sweep / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_single_seed_has_no_std_and_lr_sweeps_split_lines(tmp_path):
    fake_job(tmp_path / "a", "rewind k=0", 0.2, 0, 0.5)
    fake_job(tmp_path / "b", "rewind k=0", 0.2, 1, 0.7)
    data = json.loads((tmp_path / "b" / "results.json").read_text())
    data["config"]["optimizer"]["lr"] = 0.1
    write_results(tmp_path / "b", data)
    rows, failed = collect(tmp_path)
    assert failed == [] and sorted(r["label"] for r in rows) == ["rewind k=0 lr=0.01", "rewind k=0 lr=0.1"]
    table = [t for t in aggregate(rows) if not t["label"].startswith(DENSE_LABEL)]
    assert [t["n"] for t in table] == [1, 1] and all(t["acc1_std"] is None for t in table)


def test_report_cli_hydra_callback_and_missing_folder(sweep, tmp_path, capsys):
    out = tmp_path / "out_elsewhere"
    report_main([str(sweep), "--out", str(out)])  # python report.py <folder> --out <dir>
    assert str(out / "report.md") in capsys.readouterr().out
    assert (out / "report.md").is_file() and (out / "acc_vs_remaining.png").is_file()
    # the Hydra callback writes the same report into the sweep folder when a multirun ends
    ReportOnMultirun(title="from hydra").on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert (sweep / "report.md").read_text().startswith("# from hydra")
    with pytest.raises(ValueError, match="hydra.callbacks.report.title"):
        ReportOnMultirun(title=3)
    with pytest.raises(FileNotFoundError, match="is not a folder; pass a multirun folder"):
        make_report(tmp_path / "nope")


def test_report_refuses_a_folder_without_runs(tmp_path, capsys):
    """An empty or non-sweep folder is an error (exit 2), not an empty report that looks like a result."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "not_a_sweep" / "notes").mkdir(parents=True)
    for folder in ("empty", "not_a_sweep"):
        with pytest.raises(FileNotFoundError, match="no results.json and no Hydra job folder"):
            make_report(tmp_path / folder)
        with pytest.raises(SystemExit) as exit_info:
            report_main([str(tmp_path / folder)])
        assert exit_info.value.code == 2 and "pass a multirun folder" in capsys.readouterr().err
        assert not (tmp_path / folder / "report.md").exists()


def test_plain_sweep_jobs_are_labelled_by_their_compression_entries(tmp_path):
    for name, callbacks in {"a": {}, "b": {"magnitude_pruning": {"_target_": "netcompress.callbacks.magnitude_pruning.X"},
                                           "model_checkpoint": {"_target_": "pytorch_lightning.callbacks.X"}}}.items():
        (tmp_path / name / ".hydra").mkdir(parents=True)
        write_results(tmp_path / name, {"status": "ok", "seed": 0, "test/acc1": 0.5,
                                        "config": {"callbacks": callbacks}})
    assert sorted(r["label"] for r in collect(tmp_path)[0]) == ["dense", "magnitude_pruning"]


def test_presets_with_the_same_entries_are_told_apart_by_task_name(tmp_path):
    qat = {"qat": {"_target_": "netcompress.callbacks.qat.QAT"}}
    for name, task in (("a", "retention_mini_qat8"), ("b", "retention_mini_qat4"), ("c", "train")):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        write_results(tmp_path / name, {"status": "ok", "seed": 0, "test/acc1": 0.5,
                                        "config": {"callbacks": qat, "task_name": task}})
    assert sorted(r["label"] for r in collect(tmp_path)[0]) == [
        "qat [retention_mini_qat4]", "qat [retention_mini_qat8]", "qat [train]"]
    shutil.rmtree(tmp_path / "a")
    shutil.rmtree(tmp_path / "b")
    assert [r["label"] for r in collect(tmp_path)[0]] == ["qat"]  # one preset: its entries alone


def test_dense_jobs_of_a_rethinking_sweep_are_the_one_dense_line(tmp_path):
    """A sweep with method=dense jobs (Rethinking's unpruned column) reports each dense net once:
    the dense jobs and the dense nets the other jobs started from are the same nets."""
    for seed in (0, 1):
        fake_job(tmp_path / f"dense{seed}", "dense", 0.0, seed, DENSE[seed])
        fake_job(tmp_path / f"ft{seed}", "finetune", 0.7, seed, 0.8)
    table = aggregate(collect(tmp_path)[0])
    dense = [t for t in table if t["label"].startswith("dense")]
    assert [(t["label"], t["n"]) for t in dense] == [(DENSE_LABEL, 2)]
    assert dense[0]["acc1_mean"] == pytest.approx((DENSE[0] + DENSE[1]) / 2)


def test_confidence_intervals_and_paired_differences_against_hand_computation(sweep):
    rows, _ = collect(sweep)
    table = {(t["label"], t["sparsity"]): t for t in aggregate(rows)}
    accs = ACC[("rewind k=0", 0.2)]
    mean, std = reference(accs)
    assert table[("rewind k=0", 0.2)]["acc1_ci95"] == pytest.approx(4.302652729911275 * std / math.sqrt(3))
    from netcompress.report import paired_differences

    pairs = {(d["sparsity"], d["a"], d["b"]): d for d in paired_differences(rows)}
    d = pairs[(0.488, "reinit (Scratch-E)", "rewind k=0")]
    diffs = [r - w for r, w in zip(ACC[("reinit (Scratch-E)", 0.488)], ACC[("rewind k=0", 0.488)])]
    diff_mean, diff_std = reference(diffs)
    assert d["n"] == 3 and d["diff_mean"] == pytest.approx(diff_mean) and d["diff_std"] == pytest.approx(diff_std)
    assert d["diff_ci95"] == pytest.approx(4.302652729911275 * diff_std / math.sqrt(3))
    md = (sweep / "report.md").read_text() if (sweep / "report.md").exists() else make_report(sweep) and \
        (sweep / "report.md").read_text()
    assert "Paired differences" in md and "| 51.2% | reinit (Scratch-E) | rewind k=0 | 3 |" in md


def test_every_method_is_paired_with_its_seeds_unpruned_parent(sweep):
    """pruned minus unpruned, per seed: the parent's accuracy comes from the same seed's dense run."""
    from netcompress.report import paired_differences

    rows, _ = collect(sweep)
    pairs = {(d["sparsity"], d["a"], d["b"]): d for d in paired_differences(rows)}
    d = pairs[(0.2, "rewind k=0", DENSE_LABEL)]
    diffs = [acc - DENSE[seed] for seed, acc in enumerate(ACC[("rewind k=0", 0.2)])]
    diff_mean, diff_std = reference(diffs)
    assert d["n"] == 3 and d["diff_mean"] == pytest.approx(diff_mean) and d["diff_std"] == pytest.approx(diff_std)
    assert (0.488, "reinit (Scratch-E)", DENSE_LABEL) in pairs
    assert not any(a == DENSE_LABEL for _, a, _ in pairs)  # the parent is always B: A - B reads pruned - unpruned


# ----- retention vs compression plots (Hooker et al. 2019) -------------------------------------
# (technique, override) -> per seed: (params_ratio, flops_ratio, agreement, forgetting, per-class forgetting)
RETENTION = {
    ("magnitude_pruning", "callbacks.magnitude_pruning.sparsity=0.5"): [
        (2.0, 1.9, 0.95, 0.02, [0.0, 0.1, 0.0, 0.2]), (2.1, 1.9, 0.93, 0.03, [0.1, 0.1, None, 0.2]),
        (2.0, 2.0, 0.94, 0.05, [0.2, 0.1, 0.3, 0.2])],
    ("magnitude_pruning", "callbacks.magnitude_pruning.sparsity=0.9"): [
        (10.0, 8.0, 0.80, 0.15, [0.5, 0.4, 0.3, 0.2]), (9.0, 7.0, 0.70, 0.25, [0.3, 0.2, 0.1, 0.0])],
    ("lowrank", "callbacks.lowrank.rank=4"): [(3.0, 2.5, 0.9, 0.06, [0.0, 0.0, 0.0, 0.4])],
}


def retention_job(folder: Path, entry: str, override: str, seed: int, figures: tuple) -> None:
    """A plain run's results.json with the agreed retention/cost keys, and its Hydra overrides."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(f"- compression=[{entry}]\n- {override}\n- seed={seed}\n")
    params_ratio, flops_ratio, agreement, forgetting, per_class = figures
    write_results(folder, {"status": "ok", "seed": seed, "test/acc1": 0.9 - forgetting, "model_name": "resnet20_cifar",
                           "config": {"callbacks": {entry: {"_target_": f"netcompress.callbacks.{entry}.X"}}},
                           "cost/params_ratio": params_ratio, "cost/flops_ratio": flops_ratio,
                           "retention/agreement": agreement, "retention/forgetting": forgetting,
                           "retention/per_class_forgetting": per_class})


@pytest.fixture
def retention_sweep(tmp_path):
    n = 0
    for (entry, override), seeds in RETENTION.items():
        for seed, figures in enumerate(seeds):
            retention_job(tmp_path / "sweep" / str(n), entry, override, seed, figures)
            n += 1
    return tmp_path / "sweep"


def test_retention_vs_compression_plots_mean_and_std_over_seeds(retention_sweep, tmp_path):
    from netcompress.report import plot_retention_vs_compression

    written = {p.name for p in make_report(retention_sweep, title="ret")}
    assert {"retention_vs_params_ratio.png", "retention_vs_flops_ratio.png", "per_class_forgetting.png"} <= written
    assert "retention_vs_nonzero_params_ratio.png" not in written  # no run reports cost/nonzero_params_ratio
    for name in written - {"report.md", "report.csv"}:
        assert (retention_sweep / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![retention_vs_params_ratio.png](retention_vs_params_ratio.png)" in (retention_sweep / "report.md").read_text()
    rows, _ = collect(retention_sweep)
    for x_index, x_key in ((0, "cost/params_ratio"), (1, "cost/flops_ratio")):
        fig = plot_retention_vs_compression(rows, x_key, tmp_path / "plot.png", "ret")
        # robust/corruption_acc is in no results.json: two panels, not three
        assert [ax.get_title() for ax in fig.axes] == ["retention/agreement", "retention/forgetting"]
        for ax, y_index in zip(fig.axes, (2, 3)):
            lines = {c.get_label(): c for c in ax.containers}  # one errorbar line per technique
            assert sorted(lines) == ["lowrank", "magnitude_pruning"]
            for technique in lines:
                settings = [seeds for (entry, _), seeds in RETENTION.items() if entry == technique]
                expect = sorted((sum(s[x_index] for s in seeds) / len(seeds), reference(
                    [s[y_index] for s in seeds]) if len(seeds) > 1 else (seeds[0][y_index], 0.0)) for seeds in settings)
                data_line, _, (bars,) = lines[technique].lines
                assert list(data_line.get_xdata()) == pytest.approx([x for x, _ in expect])
                assert list(data_line.get_ydata()) == pytest.approx([m for _, (m, _) in expect])
                halves = [(seg[1][1] - seg[0][1]) / 2 for seg in bars.get_segments()]
                assert halves == pytest.approx([s for _, (_, s) in expect])


def test_per_class_forgetting_heat_map_is_the_mean_over_seeds(retention_sweep, tmp_path):
    import numpy as np

    from netcompress.report import forgetting_matrix, plot_forgetting_heatmap

    rows, _ = collect(retention_sweep)
    fig = plot_forgetting_heatmap(rows, tmp_path / "heat.png", "ret")
    ax = fig.axes[0]
    names = [t.get_text() for t in ax.get_yticklabels()]
    assert names == ["lowrank", "magnitude_pruning (sparsity=0.5)", "magnitude_pruning (sparsity=0.9)"]
    shown = ax.images[0].get_array().filled(np.nan)
    assert shown.shape == (3, 4)  # technique settings x classes
    for row, name in zip(shown, names):
        override = f"callbacks.magnitude_pruning.{name.split('(')[-1].rstrip(')')}" if "(" in name \
            else "callbacks.lowrank.rank=4"
        (seeds,) = [s for (_, o), s in RETENTION.items() if o == override]
        for c in range(4):  # mean over the seeds that have a value (None = NaN in results.json)
            values = [s[4][c] for s in seeds if s[4][c] is not None]
            assert row[c] == pytest.approx(sum(values) / len(values))
    assert forgetting_matrix(rows)[0] == names


def test_no_retention_keys_no_retention_plots(sweep, tmp_path):
    from netcompress.report import plot_forgetting_heatmap, plot_retention_vs_compression

    written = make_report(sweep)
    assert [p.name for p in written] == ["report.md", "report.csv", "acc_vs_remaining.png", "acc_vs_flops.png"]
    assert not list(sweep.glob("retention_vs_*.png")) and not (sweep / "per_class_forgetting.png").exists()
    rows, _ = collect(sweep)
    assert plot_retention_vs_compression(rows, "cost/params_ratio", tmp_path / "x.png", "t") is None
    assert plot_forgetting_heatmap(rows, tmp_path / "y.png", "t") is None
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_the_compute_column_is_the_mean_of_cumulative_steps(sweep):
    rows, _ = collect(sweep)
    table = {(t["label"], t["sparsity"]): t for t in aggregate(rows)}
    for (label, sparsity), accs in ACC.items():
        if label.startswith("dense"):
            continue
        seeds = [s for s, a in enumerate(accs)]
        expected = sum(100 * (s + 1) + round(1000 * sparsity) for s in seeds) / len(seeds)
        assert table[(label, round(sparsity, 4))]["steps_mean"] == pytest.approx(expected)
    make_report(sweep)
    assert "train steps" in (sweep / "report.md").read_text()
    assert "train_steps_mean" in (sweep / "report.csv").read_text().splitlines()[0]


def test_plain_runs_get_whole_net_fractions_from_the_cost_evaluator(retention_sweep):
    """Outside the lottery protocol, the whole net's FLOPs (and non-zero params) fraction is 1 / the cost
    evaluator's parent / child ratio; a run without cost/nonzero_params_ratio has no params fraction."""
    rows, _ = collect(retention_sweep)
    assert len(rows) == sum(len(seeds) for seeds in RETENTION.values())
    for row in rows:
        saved = json.loads((Path(row["dir"]) / "results.json").read_text())
        assert row["flops_fraction"] == pytest.approx(1 / saved["cost/flops_ratio"])
        assert row["params_fraction"] is None
    job = next(Path(r["dir"]) for r in rows)
    saved = json.loads((job / "results.json").read_text())
    write_results(job, {**saved, "cost/nonzero_params_ratio": 4.0})
    assert next(r for r in collect(retention_sweep)[0] if r["dir"] == str(job))["params_fraction"] == 0.25


def control_job(folder: Path, method: str, label: str, seed: int, acc: float, steps: int, sparsity: float = 0.0,
                round_: int = 0) -> None:
    (folder / ".hydra").mkdir(parents=True)
    write_results(folder, {
        "status": "ok", "seed": seed, "model_name": "resnet20_cifar", "test/acc1": acc, "flops": 1000,
        "lottery/method": method, "lottery/label": label, "lottery/sparsity": sparsity, "lottery/round": round_,
        "lottery/dense_test_acc1": DENSE[seed], "lottery/dense_key": f"dense-{seed}",
        "lottery/cumulative_steps": steps, "config": {"optimizer": {"lr": 0.01}}})


def test_controls_repeated_per_round_count_once_and_compute_matched_pair_with_their_round(tmp_path):
    """A sweep runs dense_reinit_seed once per swept round (the same net each time) and dense_compute_matched
    once per round at that round's compute: the first must count once per seed (n = seeds, not seeds x
    rounds), the second must not average two training lengths and must pair with the round it matches."""
    from netcompress.report import paired_differences

    n = 0
    tickets = {1: [0.40, 0.42, 0.41], 2: [0.43, 0.45, 0.44]}  # round -> per seed; 300 steps per training
    matched = {1: [0.45, 0.46, 0.44], 2: [0.50, 0.49, 0.52]}
    for seed in range(3):
        for round_ in (1, 2):
            control_job(tmp_path / str(n), "rewind", "rewind k=0", seed, tickets[round_][seed], 300 * (round_ + 1),
                        sparsity=1 - 0.5 ** round_, round_=round_)
            control_job(tmp_path / str(n + 1), "dense_reinit_seed", "dense (reinit seed)", seed, 0.37 + seed / 100, 300)
            control_job(tmp_path / str(n + 2), "dense_compute_matched", "dense (compute-matched)", seed,
                        matched[round_][seed], 300 * (round_ + 1))
            n += 3
    table = {t["label"]: t for t in aggregate(collect(tmp_path)[0])}
    assert table["dense (reinit seed)"]["n"] == 3
    assert table["dense (compute-matched), 600 steps"]["acc1_mean"] == pytest.approx(sum(matched[1]) / 3)
    assert table["dense (compute-matched), 900 steps"]["n"] == 3
    pairs = {(d["sparsity"], d["a"], d["b"]): d for d in paired_differences(collect(tmp_path)[0])}
    d = pairs[(0.75, "dense (compute-matched), 900 steps", "rewind k=0")]
    assert d["diff_mean"] == pytest.approx(sum(m - t for m, t in zip(matched[2], tickets[2])) / 3)
    assert not [k for k in pairs if "600 steps" in k[1] and k[0] != 0.5]  # paired only in its own round
    assert pairs[(0.0, "dense (reinit seed)", DENSE_LABEL)]["n"] == 3


def test_techniques_that_record_no_sparsity_show_none_instead_of_100_percent(tmp_path):
    """QAT / KD runs record no sparsity: the table and the pairs must not call them '100% remaining'."""
    from netcompress.report import paired_differences

    for n, (technique, seed, acc) in enumerate([("qat", 0, 0.50), ("qat", 1, 0.52), ("kd", 0, 0.47), ("kd", 1, 0.48)]):
        (tmp_path / str(n) / ".hydra").mkdir(parents=True)
        write_results(tmp_path / str(n), {"status": "ok", "seed": seed, "model_name": "resnet20_cifar",
                                          "test/acc1": acc, "flops": 1000,
                                          "config": {"optimizer": {"lr": 0.01}, "callbacks": {
                                              technique: {"_target_": f"netcompress.callbacks.{technique}.X"}}}})
    rows, _ = collect(tmp_path)
    [pair] = paired_differences(rows)
    assert (pair["a"], pair["b"], pair["sparsity"]) == ("kd", "qat", None)
    assert pair["diff_mean"] == pytest.approx(((0.47 - 0.50) + (0.48 - 0.52)) / 2)
    make_report(tmp_path, title="no sparsity")
    md = (tmp_path / "report.md").read_text()
    assert "100.0%" not in md and "| - |" in md
    assert {r["pruned_layer_remaining"] for r in csv.DictReader((tmp_path / "report.csv").open())} == {""}


def test_a_plain_dense_run_is_100_percent_remaining_and_qat_beside_it_is_not(tmp_path):
    """A run with no compression entry is dense by construction (100% known); QAT beside it records nothing."""
    for n, callbacks in enumerate([{}, {"qat": {"_target_": "netcompress.callbacks.qat.QAT"}}]):
        (tmp_path / str(n) / ".hydra").mkdir(parents=True)
        write_results(tmp_path / str(n), {"status": "ok", "seed": 0, "model_name": "resnet20_cifar",
                                          "test/acc1": 0.5, "config": {"callbacks": callbacks}})
    make_report(tmp_path, title="dense and qat")
    md = (tmp_path / "report.md").read_text()
    assert "| dense | 100.0% |" in md and "| qat | - |" in md
    remaining = {r["method"]: r["pruned_layer_remaining"] for r in csv.DictReader((tmp_path / "report.csv").open())}
    assert remaining["qat"] == "" and float(remaining["dense"]) == pytest.approx(1.0)
    from netcompress.report import paired_differences
    for n in (2, 3):  # a second seed of each, so they pair
        (tmp_path / str(n) / ".hydra").mkdir(parents=True)
        write_results(tmp_path / str(n), {"status": "ok", "seed": 1, "model_name": "resnet20_cifar", "test/acc1": 0.4,
                                          "config": {"callbacks": {} if n == 2 else {
                                              "qat": {"_target_": "netcompress.callbacks.qat.QAT"}}}})
    [pair] = paired_differences(collect(tmp_path)[0])
    assert pair["sparsity"] is None  # dense vs qat: one side records no sparsity, so the pair has none
