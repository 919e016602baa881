"""Summarise a sweep: mean +- std over seeds per method x sparsity, failed jobs, and plots.

    python report.py logs/lth_resnet20_cifar10_mini/multiruns/<date>_<time>   [--out DIR] [--title T]

Reads every ``results.json`` under the folder (one per job, written by run.py also when a job
fails) and writes ``report.md``, ``report.csv``, ``acc_vs_remaining.png`` (test accuracy vs the
fraction of prunable weights remaining, log scale, one line per start method with a +-1 std
band, the unpruned dense nets as a dashed line) and ``acc_vs_flops.png`` (the same against
the FLOPs of one forward pass, counting only unpruned weights). Failed or killed jobs (a job
folder without ``results.json``) are listed in the report, never dropped silently. The std is
the sample standard deviation (n - 1), blank for n = 1. The layout follows the figures of
Frankle & Carbin 2019 and Liu et al. 2019. When the runs have the evaluators' keys it also draws
what the compressed nets kept of their parents (Hooker et al. 2019, "What do compressed deep
neural networks forget?"): ``retention_vs_<ratio>.png`` (agreement, forgetting and corruption
accuracy against the parameter and FLOPs compression ratios, one line per technique, mean +- std
over seeds) and ``per_class_forgetting.png`` (technique x class heat map). ``ReportOnMultirun``
(a Hydra callback that conf/hydra/default.yaml enables) writes the same report into the sweep
folder when a multirun ends.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

RESULTS = "results.json"
OUTPUTS = ("report.md", "report.csv", "acc_vs_remaining.png", "acc_vs_flops.png")
DENSE_LABEL = "dense (unpruned)"
# Retention vs compression (drawn only when the runs have the keys; evaluation/retention.py, robustness.py, cost.py)
RETENTION_Y = {"retention/agreement": "agreement with the parent (top-1)",
               "retention/forgetting": "forgetting (parent-correct lost)",
               "robust/corruption_acc": "corruption accuracy"}
COMPRESSION_X = {  # x key -> (axis label, file name)
    "cost/params_ratio": ("compression ratio (parent / child parameters), log scale", "retention_vs_params_ratio.png"),
    "cost/nonzero_params_ratio": ("compression ratio (parent / child non-zero parameters), log scale",
                                  "retention_vs_nonzero_params_ratio.png"),
    "cost/flops_ratio": ("FLOPs reduction (parent / child FLOPs), log scale", "retention_vs_flops_ratio.png"),
}
PER_CLASS_FORGETTING = "retention/per_class_forgetting"
HEATMAP_FILE = "per_class_forgetting.png"
PLOT_KEYS = (*RETENTION_Y, *COMPRESSION_X, PER_CLASS_FORGETTING)


def _get(config: dict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _compression_label(config: dict) -> str:
    """A plain run's label: its compression entries (callbacks built from conf/compression), or dense."""
    entries = [name for name, entry in (config.get("callbacks") or {}).items()
               if isinstance(entry, dict) and str(entry.get("_target_", "")).startswith("netcompress.callbacks.")
               and name != "noop"]
    return "+".join(entries) or "dense"


def _tell_presets_apart(rows: list[dict]) -> None:
    """Plain runs with the same entries from different presets (qat at 8 and at 4 bits) get their
    ``task_name`` in the label, so they are two lines, not one."""
    tasks: dict[str, set] = defaultdict(set)
    for row in rows:
        if row["method"] == "run":
            tasks[row["label"]].add(row["task"])
    for row in rows:
        if row["method"] == "run" and len(tasks[row["label"]]) > 1:
            row["label"] = f"{row['label']} [{row['task']}]"


def _distinct_controls(rows: list[dict]) -> list[dict]:
    """Unpruned controls of a lottery sweep (round 0, not the dense parent): a control job repeated once per
    swept round is one result, kept once (else it would count n times over); a control trained as many
    optimizer steps as the pruned nets of one sparsity of its seed (the compute-matched dense net) gets
    those steps in its label and is paired with them (``paired_sparsity``)."""
    cells: dict[tuple, set] = defaultdict(set)  # (seed, lr, cumulative steps) -> sparsities of pruned rows
    for row in rows:
        if row["round"] > 0 and row["steps"] is not None:
            cells[(row["seed"], row["lr"], row["steps"])].add(round(row["sparsity"], 4))
    seen, kept = set(), []
    for row in rows:
        if row["method"] not in ("run", "dense") and row["round"] == 0 and row["dense_key"]:
            key = (row["label"], row["seed"], row["lr"], row["dense_key"], row["steps"])
            if key in seen:
                continue
            seen.add(key)
            matched = cells.get((row["seed"], row["lr"], row["steps"]), set())
            if len(matched) == 1:
                row["paired_sparsity"] = next(iter(matched))
                row["label"] = f"{row['label']}, {row['steps']} steps"
        kept.append(row)
    return kept


def _fraction(part: Any, whole: Any) -> float | None:
    return float(part) / float(whole) if part is not None and whole else None


def _row(path: Path, r: dict) -> dict:
    config = r.get("config") or {}
    sparsity = r.get("lottery/sparsity", r.get("compress/sparsity")) or 0.0
    method = r.get("lottery/method") or "run"
    label = r.get("lottery/label") or r.get("lottery/method") or _compression_label(config)
    return {
        "dir": str(path.parent), "label": label,
        "method": method, "lr": _get(config, "optimizer.lr"), "seed": r.get("seed"), "task": config.get("task_name"),
        "model": r.get("model_name"), "round": r.get("lottery/round", 0) or 0, "sparsity": float(sparsity),
        "remaining": 1.0 - float(sparsity), "acc1": r.get("test/acc1"),
        # a plain run with no compression entry is dense by construction: 100% remaining is known, not assumed
        "sparsity_recorded": "lottery/sparsity" in r or "compress/sparsity" in r or label == "dense",
        "flops": r.get("lottery/effective_flops", r.get("flops")), "dense_acc1": r.get("lottery/dense_test_acc1"),
        "dense_flops": r.get("lottery/dense_flops"), "dense_key": r.get("lottery/dense_key"),
        "train_time_s": r.get("train_time_s"), "reused": bool(r.get("lottery/reused_stage")),
        # whole-net fractions of the dense parent (structured pruning: not the kept-filter fraction); outside
        # the lottery protocol from the cost evaluator's parent / child ratios
        "params_fraction": _fraction(r.get("params_nonzero"), r.get("lottery/dense_params"))
        or _fraction(1.0, r.get("cost/nonzero_params_ratio")),
        "flops_fraction": r.get("lottery/flops_fraction") or _fraction(1.0, r.get("cost/flops_ratio")),
        # compute: optimizer steps behind the result (a pruned net's include the trainings its mask inherits)
        "steps": r.get("lottery/cumulative_steps", r.get("global_step")),
        "setting": _setting(path.parent), "extra": {key: r[key] for key in PLOT_KEYS if r.get(key) is not None},
    }


def _setting(job: Path) -> tuple[str, ...]:
    """The job's command-line overrides except its seed (``.hydra/overrides.yaml``): jobs that differ only
    in seed share a setting, and the retention plots average over them. Empty without the file."""
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ()
    from omegaconf import OmegaConf

    try:
        overrides = OmegaConf.to_container(OmegaConf.load(path)) or []
    except Exception:  # noqa: BLE001 - an unreadable file: group by label and sparsity only
        return ()
    return tuple(sorted(str(o) for o in overrides if str(o).lstrip("+~").split("=")[0] != "seed"))


def _job_dirs(root: Path) -> Iterable[Path]:
    """Hydra job folders (they hold .hydra/) under root."""
    return sorted(p.parent for p in root.rglob(".hydra") if p.is_dir() and p.parent != root)


def collect(root: str | Path) -> tuple[list[dict], list[dict]]:
    """(rows of successful jobs, failed jobs as {dir, error}) under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"report: {str(root)!r} is not a folder; pass a multirun folder "
                                "(logs/<task_name>/multiruns/<date>_<time>)")
    rows, failed, seen = [], [], set()
    for path in sorted(root.rglob(RESULTS)):
        seen.add(path.parent)
        try:
            r = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            failed.append({"dir": str(path.parent), "error": f"unreadable results.json: {exc}"})
            continue
        if r.get("status") != "ok" or r.get("test/acc1") is None:
            status = r.get("status")
            why = "still running, or killed without a trace" if status == "running" else f"status {status!r}"
            failed.append({"dir": str(path.parent), "error": r.get("error") or why})
            continue
        rows.append(_row(path, r))
    for job in _job_dirs(root):
        if job not in seen:
            failed.append({"dir": str(job), "error": "no results.json (killed before it was written?)"})
    if not rows and not failed:
        raise FileNotFoundError(f"report: no results.json and no Hydra job folder under {str(root)!r}; pass a "
                                "multirun folder (logs/<task_name>/multiruns/<date>_<time>) or a run folder")
    _tell_presets_apart(rows)
    rows = _distinct_controls(rows)
    if len({row["lr"] for row in rows}) > 1:  # a sweep over lr: one line per (method, lr)
        for row in rows:
            row["label"] = f"{row['label']} lr={row['lr']}"
    return rows, failed


def _stats(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def ci95(std: float | None, n: int) -> float | None:
    """Half-width of the 95% confidence interval of a mean of n runs (Student t, n - 1 dof)."""
    if std is None or n < 2:
        return None
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1)) * std / math.sqrt(n)


def paired_differences(rows: list[dict]) -> list[dict]:
    """Per (sparsity, method A, method B): the per-seed differences acc1(A) - acc1(B) over the seeds
    both ran (a paired design: seed noise common to both cancels), mean, std and 95% CI. Each method
    is also paired with its seed's unpruned parent (B = ``dense (unpruned)``): pruned minus unpruned."""
    by_cell: dict[tuple, dict[str, dict]] = defaultdict(lambda: defaultdict(dict))
    unpruned: dict[tuple, float] = {}  # (seed, lr) -> the dense parent's test acc1
    recorded: set[tuple] = set()  # (cell, lr, label) whose runs record a sparsity (others: techniques that do not prune)
    for row in rows:
        if row["method"] == "dense":
            unpruned[(row["seed"], row["lr"])] = float(row["acc1"])
        else:
            cell = row.get("paired_sparsity", round(row["sparsity"], 4))
            by_cell[(cell, row["lr"])][row["label"]][row["seed"]] = float(row["acc1"])
            if row.get("sparsity_recorded", True):
                recorded.add((cell, row["lr"], row["label"]))
            if row["dense_acc1"] is not None:
                unpruned.setdefault((row["seed"], row["lr"]), float(row["dense_acc1"]))
    pairs = []
    for (sparsity, lr), methods in sorted(by_cell.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        labels = sorted(methods)
        parent = {seed: acc for (seed, row_lr), acc in unpruned.items() if row_lr == lr}
        candidates = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]]
        candidates += [(a, DENSE_LABEL) for a in labels]
        for a, b in candidates:
            b_accs = parent if b == DENSE_LABEL else methods[b]
            seeds = sorted(set(methods[a]) & set(b_accs), key=str)
            if len(seeds) < 2:
                continue
            diffs = [methods[a][s] - b_accs[s] for s in seeds]
            mean, std = _stats(diffs)
            known = all((sparsity, lr, label) in recorded for label in (a, b) if label != DENSE_LABEL)
            pairs.append({"sparsity": sparsity if known else None, "a": a, "b": b,
                          "n": len(seeds), "diff_mean": mean,
                          "diff_std": std, "diff_ci95": ci95(std, len(seeds))})
    return pairs


def aggregate(rows: list[dict]) -> list[dict]:
    """One line per (label, sparsity): n, mean/std of test acc1, mean remaining fraction and FLOPs.

    The unpruned dense nets the jobs started from (``lottery/dense_test_acc1``, one per seed, model
    and lr) form a ``dense (unpruned)`` line at sparsity 0.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    dense: dict[tuple, dict] = {}
    for row in rows:
        suffix = f" lr={row['lr']}" if row["label"].endswith(f" lr={row['lr']}") else ""
        # one dense net per (seed, lr, model) of the sweep (its stage key can change with config
        # spellings that do not change the run, so it is not used to tell dense nets apart)
        if row["method"] == "dense":  # a dense job is that net itself: one line with the derived ones
            dense[(row["seed"], row["model"], suffix)] = {**row, "label": DENSE_LABEL + suffix}
        else:
            groups[(row["label"], round(row["sparsity"], 4))].append(row)
    for row in rows:
        key = (row["seed"], row["model"], f" lr={row['lr']}" if row["label"].endswith(f" lr={row['lr']}") else "")
        if row["dense_acc1"] is not None and row["method"] != "dense" and key not in dense:
            dense[key] = {"label": DENSE_LABEL + key[2], "acc1": row["dense_acc1"], "remaining": 1.0, "sparsity": 0.0,
                          "flops": row["dense_flops"], "params_fraction": 1.0, "flops_fraction": 1.0,
                          "steps": None}
    for d in dense.values():
        groups[(d["label"], 0.0)].append(d)
    table = []
    for (label, sparsity), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        mean, std = _stats([float(m["acc1"]) for m in members])
        table.append({"label": label, "sparsity": sparsity, "remaining": 1.0 - sparsity, "n": len(members),
                      "acc1_mean": mean, "acc1_std": std, "acc1_ci95": ci95(std, len(members)),
                      "flops_mean": _mean_of(members, "flops"),
                      "params_fraction": _mean_of(members, "params_fraction"),
                      "flops_fraction": _mean_of(members, "flops_fraction"),
                      "steps_mean": _mean_of(members, "steps"),
                      "sparsity_recorded": any(m.get("sparsity_recorded", True) for m in members)})
    return table


def _mean_of(members: list[dict], key: str) -> float | None:
    """Mean of ``key`` over the members that have it (None when none has)."""
    values = [m[key] for m in members if m.get(key) is not None]
    return statistics.fmean(values) if values else None


def pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def write_csv(table: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "pruned_layer_sparsity", "pruned_layer_remaining", "params_fraction",
                         "flops_fraction", "n", "test_acc1_mean", "test_acc1_std", "test_acc1_ci95", "flops_mean",
                         "train_steps_mean"])
        for t in table:
            known = t.get("sparsity_recorded", True)  # a technique that records no sparsity (QAT, KD): blank
            writer.writerow([t["label"], f"{t['sparsity']:.4f}" if known else "", f"{t['remaining']:.4f}" if known else "",
                             _fmt(t["params_fraction"], ".4f"), _fmt(t["flops_fraction"], ".4f"), t["n"],
                             f"{t['acc1_mean']:.6f}", _fmt(t["acc1_std"], ".6f"), _fmt(t["acc1_ci95"], ".6f"),
                             _fmt(t["flops_mean"], ".0f"), _fmt(t.get("steps_mean"), ".0f")])


def write_markdown(table: list[dict], failed: list[dict], path: Path, title: str, root: Path,
                   pairs: list[dict] = (), figures: Iterable[str] = ()) -> None:
    lines = [f"# {title}", "", f"Sweep folder: `{root}`; regenerate with `python report.py {root}`.", "",
             "Test top-1 accuracy (%), mean +- sample std over seeds (n runs), and the half-width of its 95% "
             "confidence interval (Student t). *Pruned layers*: the kept "
             "fraction of the pruned layers' weights (unstructured) or filters/channels (structured); "
             "*params* and *FLOPs*: the whole net's non-zero parameters and FLOPs as a fraction of its dense "
             "parent (blank where the run records no parent). *Train steps*: the optimizer steps behind the "
             "result, for a pruned net including the dense run and the IMP trainings its mask inherits "
             "(`lottery/cumulative_steps`).", "",
             "| method | pruned layers remaining | params (whole net) | FLOPs (whole net) | n | test acc1 (%) "
             "| 95% CI | FLOPs (M) | train steps |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in table:
        std = f" +- {100 * t['acc1_std']:.2f}" if t["acc1_std"] is not None else ""
        flops = _fmt(t["flops_mean"] / 1e6 if t["flops_mean"] else None, ".2f")
        params_fraction = _fmt(100 * t["params_fraction"] if t["params_fraction"] is not None else None, ".1f")
        flops_fraction = _fmt(100 * t["flops_fraction"] if t["flops_fraction"] is not None else None, ".1f")
        remaining = f"{100 * t['remaining']:.1f}%" if t.get("sparsity_recorded", True) else "-"
        lines.append(f"| {t['label']} | {remaining} | {params_fraction + '%' if params_fraction else ''} "
                     f"| {flops_fraction + '%' if flops_fraction else ''} | {t['n']} "
                     f"| {100 * t['acc1_mean']:.2f}{std} | {_fmt(pct(t['acc1_ci95']), '.2f')} | {flops} "
                     f"| {_fmt(t.get('steps_mean'), '.0f')} |")
    if pairs:
        lines += ["", "Paired differences (same seeds; same sparsity where the runs record one, else - ): "
                  "acc1(A) - acc1(B) in points, mean +- std and 95% CI; an interval that contains 0 is no evidence "
                  "of a difference.", "",
                  "| pruned layers remaining | A | B | n | A - B | 95% CI |", "|---:|---|---|---:|---:|---:|"]
        for d in pairs:
            std = f" +- {100 * d['diff_std']:.2f}" if d["diff_std"] is not None else ""
            lo, hi = d["diff_mean"] - (d["diff_ci95"] or 0.0), d["diff_mean"] + (d["diff_ci95"] or 0.0)
            cell = f"{100 * (1 - d['sparsity']):.1f}%" if d["sparsity"] is not None else "-"
            lines.append(f"| {cell} | {d['a']} | {d['b']} | {d['n']} "
                         f"| {100 * d['diff_mean']:+.2f}{std} | [{100 * lo:+.2f}, {100 * hi:+.2f}] |")
    figures = list(figures)
    if figures:
        lines += ["", "What the compressed nets kept of their parents (mean +- std over seeds; Hooker et al. 2019):", ""]
        lines += [f"![{name}]({name})" for name in figures]
    lines += ["", f"Failed jobs: {len(failed)}"]
    lines += [f"- `{f['dir']}`: {f['error'].splitlines()[0] if f['error'] else ''}" for f in failed]
    path.write_text("\n".join(lines) + "\n")


def _plot(table: list[dict], x_key: str, xlabel: str, path: Path, title: str, invert: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ticks: set[float] = set()
    lines: dict[str, list[dict]] = defaultdict(list)
    for t in table:
        lines[t["label"]].append(t)
    for label, points in sorted(lines.items()):
        points = sorted((p for p in points if p.get(x_key)), key=lambda p: p[x_key])
        if not points:
            continue
        xs = [p[x_key] * (100 if x_key == "remaining" else 1) for p in points]
        mean = [100 * p["acc1_mean"] for p in points]
        std = [100 * (p["acc1_std"] or 0.0) for p in points]
        if label.startswith(DENSE_LABEL) and x_key == "remaining":
            line = ax.axhline(mean[0], linestyle="--", color="gray", label=label)
            ax.axhspan(mean[0] - std[0], mean[0] + std[0], color=line.get_color(), alpha=0.12)
            continue
        ticks.update(xs)
        (line,) = ax.plot(xs, mean, marker="o", label=label)
        ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.18)
    ax.set_xscale("log")
    if ticks:  # label the measured points in plain numbers (% left, or MFLOPs)
        ax.set_xticks(sorted(ticks))
        scale = 1 if x_key == "remaining" else 1e-6
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v * scale:.3g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    if invert:
        ax.invert_xaxis()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # runs without FLOPs figures draw no line
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----- retention vs compression (Hooker et al. 2019) ------------------------------------------
def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _settings(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows grouped by setting: (label, sparsity, overrides but seed); each group's rows are its seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["label"], round(row["sparsity"], 4), row.get("setting", ()))].append(row)
    return groups


def _setting_names(keys: Iterable[tuple]) -> dict[tuple, str]:
    """A row name per setting: the technique label, plus what tells its settings apart (the differing
    overrides, else the sparsity) when the technique has more than one."""
    by_label: dict[str, list[tuple]] = defaultdict(list)
    for key in keys:
        by_label[key[0]].append(key)
    names = {}
    for label, group in by_label.items():
        common = set.intersection(*(set(k[2]) for k in group))
        for key in group:
            parts = [o.removeprefix(f"callbacks.{label}.") for o in key[2] if o not in common] if len(group) > 1 else []
            if not parts and len({k[1] for k in group}) > 1:
                parts = [f"sparsity={key[1]:g}"]
            names[key] = f"{label} ({', '.join(parts)})" if parts else label
    return names


def compression_curves(rows: list[dict], x_key: str, y_key: str) -> dict[str, list[dict]]:
    """Per technique (label): one point per setting, over the seeds that report both keys: x (mean of
    ``x_key``), y_mean, y_std (sample std, None for n = 1) and n; sorted by x."""
    curves: dict[str, list[dict]] = defaultdict(list)
    for (label, _, _), members in _settings(rows).items():
        pairs = [(float(m["extra"][x_key]), float(m["extra"][y_key])) for m in members
                 if _finite(m["extra"].get(x_key)) and _finite(m["extra"].get(y_key))]
        if not pairs:
            continue
        y_mean, y_std = _stats([y for _, y in pairs])
        curves[label].append({"x": statistics.fmean(x for x, _ in pairs), "y_mean": y_mean, "y_std": y_std,
                              "n": len(pairs)})
    return {label: sorted(points, key=lambda p: p["x"]) for label, points in sorted(curves.items())}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_retention_vs_compression(rows: list[dict], x_key: str, path: Path, title: str):
    """One panel per retention metric the runs report (RETENTION_Y) against ``x_key``, one errorbar line
    per technique (mean +- std over seeds); writes ``path`` and returns the figure, or None (no data)."""
    panels = {y: curves for y in RETENTION_Y if (curves := compression_curves(rows, x_key, y))}
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (y_key, curves) in zip(axes[0], panels.items()):
        xs_all = []
        for label, points in curves.items():
            xs = [p["x"] for p in points]
            xs_all += xs
            ax.errorbar(xs, [p["y_mean"] for p in points], yerr=[p["y_std"] or 0.0 for p in points],
                        marker="o", capsize=3, label=label)
        if xs_all and min(xs_all) > 0:
            from matplotlib.ticker import FuncFormatter

            ax.set_xscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:.3g}")  # 2, 5, 10 rather than 2x10^0
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(plain)
        ax.set_xlabel(COMPRESSION_X[x_key][0], fontsize=8)
        ax.set_ylabel(RETENTION_Y[y_key])
        ax.set_title(y_key, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def forgetting_matrix(rows: list[dict]) -> tuple[list[str], list[list[float]]]:
    """(row names, technique x class matrix) of ``retention/per_class_forgetting``, mean over seeds per
    setting (NaN where no seed has a value; a shorter class list is padded with NaN)."""
    import numpy as np

    groups = _settings(rows)
    names = _setting_names(groups)
    found = []
    for key, members in sorted(groups.items(), key=lambda kv: names[kv[0]]):
        lists = [m["extra"][PER_CLASS_FORGETTING] for m in members if isinstance(m["extra"].get(PER_CLASS_FORGETTING), list)]
        if lists:
            found.append((names[key], lists))
    if not found:
        return [], []
    width = max(len(v) for _, lists in found for v in lists)
    matrix = []
    for _, lists in found:
        block = np.full((len(lists), width), np.nan)
        for i, values in enumerate(lists):
            block[i, :len(values)] = [np.nan if v is None else float(v) for v in values]
        counts = (~np.isnan(block)).sum(0)
        means = np.where(counts > 0, np.nansum(block, 0) / np.maximum(counts, 1), np.nan)
        matrix.append(means.tolist())
    return [name for name, _ in found], matrix


def plot_forgetting_heatmap(rows: list[dict], path: Path, title: str):
    """Technique x class heat map of the per-class forgetting (mean over seeds); writes ``path`` and
    returns the figure, or None when no run reports it."""
    import numpy as np

    names, matrix = forgetting_matrix(rows)
    if not names:
        return None
    plt = _pyplot()
    data = np.array(matrix, dtype=float)
    n_rows, n_classes = data.shape
    label_width = 0.07 * max(len(name) for name in names)  # inches of the row names at fontsize 7
    fig, ax = plt.subplots(figsize=(min(label_width + 2.5 + 0.3 * n_classes, 24), 1.8 + 0.3 * n_rows))
    image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap="magma_r", vmin=0.0,
                      vmax=max(float(np.nanmax(data)) if np.isfinite(data).any() else 1.0, 1e-12))
    ax.set_yticks(range(n_rows), names, fontsize=7)
    if n_classes <= 40:
        ax.set_xticks(range(n_classes))
        ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("class")
    ax.set_title(f"{title}: per-class forgetting", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02).set_label("parent-correct examples lost", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def retention_plots(rows: list[dict], out: Path, title: str) -> list[Path]:
    """The retention figures whose keys the runs report (none when absent); returns the paths written."""
    written = []
    for x_key, (_, name) in COMPRESSION_X.items():
        if plot_retention_vs_compression(rows, x_key, out / name, title) is not None:
            written.append(out / name)
    if plot_forgetting_heatmap(rows, out / HEATMAP_FILE, title) is not None:
        written.append(out / HEATMAP_FILE)
    return written


def make_report(root: str | Path, out: str | Path | None = None, title: str | None = None) -> list[Path]:
    """Write report.md, report.csv and the two PNGs for the sweep under ``root``; returns their paths."""
    root = Path(root)
    rows, failed = collect(root)
    out = Path(out) if out else root
    out.mkdir(parents=True, exist_ok=True)
    title = title or f"Pruning report: {root.name}"
    table = aggregate(rows)
    paths = [out / name for name in OUTPUTS]
    _plot(table, "remaining", "weights remaining (%) of the pruned layers, log scale", paths[2], title, invert=True)
    _plot(table, "flops_mean", "MFLOPs per image (unpruned weights only), log scale", paths[3], title, invert=True)
    extra = retention_plots(rows, out, title)
    write_markdown(table, failed, paths[0], title, root, paired_differences(rows), figures=[p.name for p in extra])
    write_csv(table, paths[1])
    return paths + extra


class ReportOnMultirun(Callback):
    """``on_multirun_end``: ``report.make_report(<sweep dir>)``; a report failure is logged, not raised
    (the sweep's results.json files are the record; the report can be rerun with ``python report.py``)."""

    def __init__(self, title: str | None = None) -> None:
        if title is not None and not isinstance(title, str):
            raise ValueError(f"`hydra.callbacks.report.title` must be a string or null; got {title!r}")
        self.title = title

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            written = make_report(sweep_dir, title=self.title)
            log.info("report written: %s", ", ".join(str(p) for p in written))
        except Exception as exc:  # noqa: BLE001 - the sweep itself succeeded
            log.error("report.py failed on %s: %s: %s (rerun: python report.py %s)", sweep_dir,
                      type(exc).__name__, exc, sweep_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Summarise a pruning sweep (results.json files) as tables and plots.")
    parser.add_argument("folder", help="a multirun folder (or any folder holding results.json files)")
    parser.add_argument("--out", default=None, help="where to write the report (default: the folder itself)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    try:
        written = make_report(args.folder, args.out, args.title)
    except FileNotFoundError as exc:
        parser.exit(2, f"{exc}\n")
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
