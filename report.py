"""Summarise a sweep: mean +- std over seeds per method x sparsity, failed jobs, and plots.

    python report.py logs/lth_resnet20_cifar10_mini/multiruns/<date>_<time>   [--out DIR] [--title T]

Reads every ``results.json`` under the folder (one per job, written by run.py also when a job
fails) and writes ``report.md``, ``report.csv``, ``acc_vs_remaining.png`` (test accuracy vs the
fraction of prunable weights remaining, log scale, one line per start method with a +-1 std
band, the unpruned dense nets as a dashed line) and ``acc_vs_flops.png`` (the same against
the FLOPs of one forward pass, counting only unpruned weights). Failed or killed jobs (a job
folder without ``results.json``) are listed in the report, never dropped silently. The std is
the sample standard deviation (n - 1), blank for n = 1. The layout follows the figures of
Frankle & Carbin 2019 and Liu et al. 2019. ``ReportOnMultirun`` (a Hydra callback that
conf/hydra/default.yaml enables) writes the same report into the sweep folder when a multirun ends.
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


def _fraction(part: Any, whole: Any) -> float | None:
    return float(part) / float(whole) if part is not None and whole else None


def _row(path: Path, r: dict) -> dict:
    config = r.get("config") or {}
    sparsity = r.get("lottery/sparsity", r.get("compress/sparsity")) or 0.0
    method = r.get("lottery/method") or "run"
    return {
        "dir": str(path.parent), "label": r.get("lottery/label") or r.get("lottery/method") or _compression_label(config),
        "method": method, "lr": _get(config, "optimizer.lr"), "seed": r.get("seed"),
        "model": r.get("model_name"), "round": r.get("lottery/round", 0) or 0, "sparsity": float(sparsity),
        "remaining": 1.0 - float(sparsity), "acc1": r.get("test/acc1"),
        "flops": r.get("lottery/effective_flops", r.get("flops")), "dense_acc1": r.get("lottery/dense_test_acc1"),
        "dense_flops": r.get("lottery/dense_flops"), "dense_key": r.get("lottery/dense_key"),
        "train_time_s": r.get("train_time_s"), "reused": bool(r.get("lottery/reused_stage")),
        # whole-net fractions of the dense parent (structured pruning: not the kept-filter fraction)
        "params_fraction": _fraction(r.get("params_nonzero"), r.get("lottery/dense_params")),
        "flops_fraction": r.get("lottery/flops_fraction"),
    }


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
    both ran (a paired design: seed noise common to both cancels), mean, std and 95% CI."""
    by_cell: dict[tuple, dict[str, dict]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        if row["method"] != "dense":
            by_cell[(round(row["sparsity"], 4), row["lr"])][row["label"]][row["seed"]] = float(row["acc1"])
    pairs = []
    for (sparsity, _), methods in sorted(by_cell.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        labels = sorted(methods)
        for i, a in enumerate(labels):
            for b in labels[i + 1:]:
                seeds = sorted(set(methods[a]) & set(methods[b]), key=str)
                if len(seeds) < 2:
                    continue
                diffs = [methods[a][s] - methods[b][s] for s in seeds]
                mean, std = _stats(diffs)
                pairs.append({"sparsity": sparsity, "a": a, "b": b, "n": len(seeds), "diff_mean": mean,
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
                          "flops": row["dense_flops"], "params_fraction": 1.0, "flops_fraction": 1.0}
    for d in dense.values():
        groups[(d["label"], 0.0)].append(d)
    table = []
    for (label, sparsity), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        mean, std = _stats([float(m["acc1"]) for m in members])
        table.append({"label": label, "sparsity": sparsity, "remaining": 1.0 - sparsity, "n": len(members),
                      "acc1_mean": mean, "acc1_std": std, "acc1_ci95": ci95(std, len(members)),
                      "flops_mean": _mean_of(members, "flops"),
                      "params_fraction": _mean_of(members, "params_fraction"),
                      "flops_fraction": _mean_of(members, "flops_fraction")})
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
                         "flops_fraction", "n", "test_acc1_mean", "test_acc1_std", "test_acc1_ci95", "flops_mean"])
        for t in table:
            writer.writerow([t["label"], f"{t['sparsity']:.4f}", f"{t['remaining']:.4f}",
                             _fmt(t["params_fraction"], ".4f"), _fmt(t["flops_fraction"], ".4f"), t["n"],
                             f"{t['acc1_mean']:.6f}", _fmt(t["acc1_std"], ".6f"), _fmt(t["acc1_ci95"], ".6f"),
                             _fmt(t["flops_mean"], ".0f")])


def write_markdown(table: list[dict], failed: list[dict], path: Path, title: str, root: Path,
                   pairs: list[dict] = ()) -> None:
    lines = [f"# {title}", "", f"Sweep folder: `{root}`; regenerate with `python report.py {root}`.", "",
             "Test top-1 accuracy (%), mean +- sample std over seeds (n runs), and the half-width of its 95% "
             "confidence interval (Student t). *Pruned layers*: the kept "
             "fraction of the pruned layers' weights (unstructured) or filters/channels (structured); "
             "*params* and *FLOPs*: the whole net's non-zero parameters and FLOPs as a fraction of its dense "
             "parent (blank where the run records no parent).", "",
             "| method | pruned layers remaining | params (whole net) | FLOPs (whole net) | n | test acc1 (%) "
             "| 95% CI | FLOPs (M) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for t in table:
        std = f" +- {100 * t['acc1_std']:.2f}" if t["acc1_std"] is not None else ""
        flops = _fmt(t["flops_mean"] / 1e6 if t["flops_mean"] else None, ".2f")
        params_fraction = _fmt(100 * t["params_fraction"] if t["params_fraction"] is not None else None, ".1f")
        flops_fraction = _fmt(100 * t["flops_fraction"] if t["flops_fraction"] is not None else None, ".1f")
        lines.append(f"| {t['label']} | {100 * t['remaining']:.1f}% | {params_fraction + '%' if params_fraction else ''} "
                     f"| {flops_fraction + '%' if flops_fraction else ''} | {t['n']} "
                     f"| {100 * t['acc1_mean']:.2f}{std} | {_fmt(pct(t['acc1_ci95']), '.2f')} | {flops} |")
    if pairs:
        lines += ["", "Paired differences (same seeds, same sparsity): acc1(A) - acc1(B) in points, mean +- std "
                  "and 95% CI; an interval that contains 0 is no evidence of a difference.", "",
                  "| pruned layers remaining | A | B | n | A - B | 95% CI |", "|---:|---|---|---:|---:|---:|"]
        for d in pairs:
            std = f" +- {100 * d['diff_std']:.2f}" if d["diff_std"] is not None else ""
            lo, hi = d["diff_mean"] - (d["diff_ci95"] or 0.0), d["diff_mean"] + (d["diff_ci95"] or 0.0)
            lines.append(f"| {100 * (1 - d['sparsity']):.1f}% | {d['a']} | {d['b']} | {d['n']} "
                         f"| {100 * d['diff_mean']:+.2f}{std} | [{100 * lo:+.2f}, {100 * hi:+.2f}] |")
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
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_report(root: str | Path, out: str | Path | None = None, title: str | None = None) -> list[Path]:
    """Write report.md, report.csv and the two PNGs for the sweep under ``root``; returns their paths."""
    root = Path(root)
    rows, failed = collect(root)
    out = Path(out) if out else root
    out.mkdir(parents=True, exist_ok=True)
    title = title or f"Pruning report: {root.name}"
    table = aggregate(rows)
    paths = [out / name for name in OUTPUTS]
    write_markdown(table, failed, paths[0], title, root, paired_differences(rows))
    write_csv(table, paths[1])
    _plot(table, "remaining", "weights remaining (%) of the pruned layers, log scale", paths[2], title, invert=True)
    _plot(table, "flops_mean", "MFLOPs per image (unpruned weights only), log scale", paths[3], title, invert=True)
    return paths


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
