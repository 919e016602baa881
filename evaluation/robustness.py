"""Robustness of a compressed net and its dense parent (``evaluation=[robustness]``): common
corruptions and L-inf adversarial attacks, in pixel space.

* Common corruptions (Hendrycks & Dietterich, ICLR 2019, "Benchmarking Neural Network
  Robustness to Common Corruptions and Perturbations"): the test set corrupted on the fly by
  ``evaluation/corruptions.py`` (CIFAR-10-C severities), each batch corrupted once per
  (corruption, severity) and scored by the net and the parent in the same pass. The corruption
  error ``mCE`` and ``relative mCE`` are the paper's, with the **dense parent in AlexNet's
  place** (1.0 = as robust as the parent, below 1 = more robust):

      mCE          = mean_c  sum_s E_net(c, s) / sum_s E_parent(c, s)
      relative mCE = mean_c  sum_s (E_net(c, s) - E_net,clean) / sum_s (E_parent(c, s) - E_parent,clean)

  with E = 1 - top-1 accuracy; a corruption whose denominator is 0 makes the mean NaN (null).
* Adversarial: FGSM (Goodfellow et al. 2015, ``x + eps sign(grad_x CE)``) and PGD (Madry et
  al. 2018: a uniform random start in the eps-ball, then ``steps`` FGSM steps of ``step_size``,
  each projected back onto the ball and [0, 1]) against each net itself (white box), on the
  first ``adversarial_samples`` test images. The FGSM step is captum's ``captum.robust.FGSM``
  with its small-gradient threshold set to 0 (the exact closed form); the PGD loop is written
  out so that its random start draws from this evaluator's seeded generator.

The nets take normalised inputs; every attack and corruption works on pixels in [0, 1]
(``x * std + mean`` with the datamodule's statistics) and feeds ``(x - mean) / std`` to the net.
Keys (accuracies in [0, 1]): docs/retention.md (Robustness).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from netcompress.evaluation.corruptions import CORRUPTIONS, SEVERITIES
from netcompress.evaluation.evaluate import evaluate
from netcompress.evaluation.evaluators import register_evaluator
from netcompress.evaluation.metrics import ClassificationMetrics, OnReference

log = logging.getLogger(__name__)
ARG = "evaluators.robustness"
PARENT_PREFIX = "robust/parent_"  # the parent's figures: what cache_dir stores
Forward = Callable[[Tensor], Tensor]  # pixels in [0, 1] -> logits


# ----- corruption errors (Hendrycks & Dietterich 2019, the parent as the baseline) -------------------------

def mce(errors: Mapping[str, Sequence[float]], parent_errors: Mapping[str, Sequence[float]]) -> float:
    """Mean corruption error: mean over corruptions c of ``sum_s E(c, s) / sum_s E_parent(c, s)``.

    ``errors[c]`` lists the top-1 errors at the severities (the same ones for both nets). NaN if
    some corruption's parent errors sum to 0.
    """
    ratios = [_ratio(sum(errors[c]), sum(parent_errors[c])) for c in errors]
    return sum(ratios) / len(ratios) if ratios else math.nan


def relative_mce(errors: Mapping[str, Sequence[float]], clean_error: float,
                 parent_errors: Mapping[str, Sequence[float]], parent_clean_error: float) -> float:
    """Relative mCE: mean over c of ``sum_s (E(c, s) - E_clean) / sum_s (E_parent(c, s) - E_parent,clean)``.

    NaN if some corruption's denominator is 0 (the parent loses nothing to it)."""
    ratios = [_ratio(sum(e - clean_error for e in errors[c]),
                     sum(e - parent_clean_error for e in parent_errors[c])) for c in errors]
    return sum(ratios) / len(ratios) if ratios else math.nan


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 and not math.isnan(den) else math.nan


# ----- attacks in pixel space ------------------------------------------------------------------------------

def pixel_forward(net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> Forward:
    """``pixels -> net((pixels - mean) / std)``: the net as a function of [0, 1] images."""
    device = _device(net)
    m = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return lambda pixels: net((pixels - m) / s)


def _ce_per_sample(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits, targets, reduction="none")  # summed by captum: per-sample gradients


def fgsm(forward: Forward, pixels: Tensor, targets: Tensor, epsilon: float) -> Tensor:
    """FGSM: ``clamp(x + epsilon * sign(grad_x CE(forward(x), y)), 0, 1)`` (captum's FGSM)."""
    from captum.robust import FGSM

    attack = FGSM(forward, loss_func=_ce_per_sample, lower_bound=0.0, upper_bound=1.0)
    attack.zero_thresh = 0.0  # captum leaves |grad| <= 1e-6 unperturbed by default; the paper's form has none
    with torch.enable_grad():  # inputs that already require grad: captum then leaves them as they are, silently
        return attack.perturb(pixels.detach().clone().requires_grad_(True), epsilon, targets).detach()


def pgd(forward: Forward, pixels: Tensor, targets: Tensor, epsilon: float, step_size: float, steps: int,
        random_start: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """L-inf PGD: optional uniform start in the epsilon-ball, then ``steps`` FGSM steps of ``step_size``,
    each projected onto ``[x - epsilon, x + epsilon]`` and [0, 1] (captum's PGD loop, seeded start)."""
    adversarial = pixels
    if random_start:
        device = generator.device if generator is not None else pixels.device
        noise = torch.rand(pixels.shape, generator=generator, device=device, dtype=pixels.dtype).to(pixels.device)
        adversarial = (pixels + epsilon * (2 * noise - 1)).clamp(0, 1)
    low, high = pixels - epsilon, pixels + epsilon
    for _ in range(steps):
        adversarial = fgsm(forward, adversarial, targets, step_size)
        adversarial = torch.max(torch.min(adversarial, high), low).clamp(0, 1)
    return adversarial


# ----- the evaluator -----------------------------------------------------------------------------------------

def _device(net: nn.Module) -> torch.device:
    tensor = next(net.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@contextmanager
def _eval_mode(*nets: nn.Module | None) -> Iterator[None]:
    nets = [n for n in nets if n is not None]
    modes = [n.training for n in nets]
    for n in nets:
        n.eval()
    try:
        yield
    finally:
        for n, mode in zip(nets, modes):
            n.train(mode)


def _stream_seed(seed: int, *names: Any) -> int:
    """A 63-bit seed for one random stream, a pure function of (seed, names): the draws of one
    (corruption, severity) do not depend on which others are configured."""
    digest = hashlib.sha256("/".join(map(str, (seed, *names))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _check_int(key: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{ARG}.{key}` must be an int >= {low}; got {value!r}")


@register_evaluator("robustness")
class Robustness:
    """Accuracy under common corruptions and adversarial attacks, of the net and (if any) its dense parent.

    Args:
        corruptions: names from ``evaluation.corruptions.CORRUPTIONS`` (default: all seven).
        severities: severities 1..5 to run (default: all).
        seed: seeds the noise corruptions and PGD's random start (one stream per corruption and
            severity, drawn on the CPU: the same images on CPU and GPU).
        max_samples: score corruptions on the first this many test images (served classes interleaved, so
            balanced); 2000 by default, which keeps the evaluator near 15 test passes on CIFAR-10's
            10,000 images; None = the whole test set, as Hendrycks & Dietterich.
        fgsm: run FGSM (``robust/fgsm_acc``).
        pgd_steps: PGD steps; 0 = no PGD.
        epsilon: L-inf radius of both attacks in pixel units on the [0, 1] scale (8/255 = 0.0314).
        pgd_step_size: PGD step in pixel units (2/255 = 0.00784).
        pgd_random_start: start PGD at a uniform random point of the epsilon-ball.
        adversarial_samples: attack the first this many test images; 0 = no attacks.
        cache_dir: folder of the parent's figures, keyed by a hash of the parent's weights, these
            settings and the test images: every job of a sweep compressing one dense net computes
            the parent's 36 corrupted passes and attacks once (None = always recompute).
    """

    name = "robustness"

    def __init__(self, corruptions: Sequence[str] = tuple(CORRUPTIONS), severities: Sequence[int] = SEVERITIES,
                 seed: int = 0, max_samples: int | None = 2000, fgsm: bool = True, pgd_steps: int = 10,
                 epsilon: float = 8 / 255, pgd_step_size: float = 2 / 255, pgd_random_start: bool = True,
                 adversarial_samples: int = 256, cache_dir: str | None = None) -> None:
        if isinstance(corruptions, str) or not isinstance(corruptions, Sequence) \
                or any(c not in CORRUPTIONS for c in corruptions) or len(set(corruptions)) != len(corruptions):
            raise ValueError(f"`{ARG}.corruptions` must be a list of distinct names from {', '.join(CORRUPTIONS)} "
                             f"(or []); got {corruptions!r}")
        if not isinstance(severities, Sequence) or not severities or len(set(severities)) != len(severities) \
                or any(isinstance(s, bool) or not isinstance(s, int) or s not in SEVERITIES for s in severities):
            raise ValueError(f"`{ARG}.severities` must be a non-empty list of distinct ints in 1..5; "
                             f"got {severities!r}")
        _check_int("seed", seed, 0)
        if max_samples is not None:
            _check_int("max_samples", max_samples, 1)
        if not isinstance(fgsm, bool):
            raise TypeError(f"`{ARG}.fgsm` must be true or false; got {fgsm!r}")
        if not isinstance(pgd_random_start, bool):
            raise TypeError(f"`{ARG}.pgd_random_start` must be true or false; got {pgd_random_start!r}")
        _check_int("pgd_steps", pgd_steps, 0)
        _check_int("adversarial_samples", adversarial_samples, 0)
        for key, value in (("epsilon", epsilon), ("pgd_step_size", pgd_step_size)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ValueError(f"`{ARG}.{key}` must be a number in (0, 1] (pixel units on the [0, 1] scale, "
                                 f"e.g. 8/255 = 0.0314); got {value!r}")
        self.corruptions, self.severities = list(corruptions), list(severities)
        self.seed, self.max_samples = seed, max_samples
        self.fgsm, self.pgd_steps, self.epsilon = fgsm, pgd_steps, float(epsilon)
        self.pgd_step_size, self.pgd_random_start = float(pgd_step_size), pgd_random_start
        self.adversarial_samples = adversarial_samples
        if cache_dir is not None and (not isinstance(cache_dir, str) or not cache_dir):
            raise TypeError(f"`{ARG}.cache_dir` must be null or a folder path; got {cache_dir!r}")
        self.cache_dir = Path(cache_dir) if cache_dir else None

    def __call__(self, net: nn.Module, datamodule: Any, parent: nn.Module | None,
                 out_dir: Path | None = None) -> dict[str, Any]:
        if not hasattr(datamodule, "mean") or not hasattr(datamodule, "std"):
            raise TypeError(f"evaluation.robustness needs the datamodule's normalisation `mean` and `std` "
                            f"(pixel space); {type(datamodule).__name__} has none")
        if parent is None:
            log.info("evaluation.%s: no parent net (init_from, a KD teacher or a protocol's dense stage): "
                     "reporting the net's accuracies only, skipping robust/mce, robust/relative_mce and "
                     "robust/parent_*",
                     self.name)
        device = _device(net)
        parent = parent.to(device) if parent is not None else None
        stats = [torch.as_tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1)
                 for v in (datamodule.mean, datamodule.std)]
        cache = self._cache_file(parent, datamodule, device) if parent is not None else None
        cached = json.loads(cache.read_text()) if cache is not None and cache.is_file() else None
        figures: dict[str, Any] = {}
        with _eval_mode(net, parent):
            figures.update(self._corruptions(net, parent if cached is None else None, datamodule, device, *stats))
            if self.adversarial_samples and (self.fgsm or self.pgd_steps):
                figures.update(self._adversarial(net, parent if cached is None else None, datamodule, device, *stats))
        if parent is None:
            return figures
        parent_keys = {k: v for k, v in figures.items() if k.startswith(PARENT_PREFIX)}
        if cached is None:
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(parent_keys))
                os.replace(tmp, cache)  # atomic: concurrent jobs of a sweep never read half a file
        else:
            log.info("evaluation.%s: the parent's figures come from %s (same parent weights, settings and test "
                     "images)", self.name, cache)
            figures.update(cached)
            figures.update(self._against_parent(figures))
        return figures

    # --- the parent's figures, computed once per (parent, settings, test images)

    def _cache_file(self, parent: nn.Module, datamodule: Any, device: torch.device) -> Path | None:
        """``cache_dir/<sha256>.json``: the hash covers the parent's state, these settings and every test image."""
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256()
        settings = {k: v for k, v in vars(self).items() if k != "cache_dir"}
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
        for key, tensor in parent.state_dict().items():
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        limit = max(self.max_samples or 0, self.adversarial_samples) if self.max_samples is not None else None
        for inputs, targets in self._batches(datamodule.test_dataloader(), torch.device("cpu"), limit):
            digest.update(inputs.float().contiguous().numpy().tobytes())
            digest.update(targets.cpu().numpy().tobytes())
        return self.cache_dir / f"{digest.hexdigest()}.json"

    @staticmethod
    def _against_parent(figures: Mapping[str, Any]) -> dict[str, Any]:
        """mCE and relative mCE from the net's and the (cached) parent's per-severity accuracies."""
        errors: dict[str, list[float]] = {}
        parent_errors: dict[str, list[float]] = {}
        for key, value in figures.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[2].startswith("s") and not parts[1].startswith("parent_"):
                errors.setdefault(parts[1], []).append(1 - value)
                parent_errors.setdefault(parts[1], []).append(1 - figures[f"{PARENT_PREFIX}{parts[1]}/{parts[2]}"])
        if not errors:
            return {}
        return {"robust/mce": mce(errors, parent_errors),
                "robust/relative_mce": relative_mce(errors, 1 - figures["robust/clean_acc"], parent_errors,
                                                    1 - figures[f"{PARENT_PREFIX}clean_acc"])}

    # --- common corruptions: one pass over the (first max_samples) test images per (corruption, severity)

    def _accuracies(self, net: nn.Module, parent: nn.Module | None, batches: Iterable,
                    num_classes: int) -> tuple[float, float | None]:
        metrics = [ClassificationMetrics(num_classes)]
        if parent is not None:
            metrics.append(OnReference(ClassificationMetrics(num_classes), "parent_"))
        found = evaluate(net, batches, metrics, reference=parent)
        return found["acc1"], found.get("parent_acc1")

    def _batches(self, loader: Iterable, device: torch.device, limit: int | None,
                 transform: Callable[[Tensor], Tensor] | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        seen = 0
        for inputs, targets in loader:
            if limit is not None:
                if seen >= limit:
                    return
                inputs, targets = inputs[:limit - seen], targets[:limit - seen]
            seen += len(targets)
            inputs = inputs.to(device, non_blocking=True)
            yield (transform(inputs) if transform is not None else inputs), targets

    def _corruptions(self, net, parent, datamodule, device, mean, std) -> dict[str, Any]:
        num_classes = int(datamodule.num_classes)
        run = lambda transform=None: self._accuracies(  # noqa: E731
            net, parent, self._batches(datamodule.test_dataloader(), device, self.max_samples, transform), num_classes)
        clean, parent_clean = run()
        figures: dict[str, Any] = {"robust/clean_acc": clean}
        if parent is not None:
            figures[f"{PARENT_PREFIX}clean_acc"] = parent_clean
        errors: dict[str, list[float]] = {}
        parent_errors: dict[str, list[float]] = {}
        for name in self.corruptions:
            corruption = CORRUPTIONS[name]
            for severity in self.severities:
                generator = torch.Generator().manual_seed(_stream_seed(self.seed, name, severity))

                def transform(inputs: Tensor, corruption=corruption, severity=severity, generator=generator) -> Tensor:
                    pixels = (inputs.float() * std + mean).clamp_(0, 1)
                    return (corruption(pixels, severity, generator) - mean) / std

                acc, parent_acc = run(transform)
                figures[f"robust/{name}/s{severity}"] = acc
                errors.setdefault(name, []).append(1 - acc)
                if parent is not None:
                    parent_errors.setdefault(name, []).append(1 - parent_acc)
                    figures[f"{PARENT_PREFIX}{name}/s{severity}"] = parent_acc
            figures[f"robust/{name}"] = 1 - sum(errors[name]) / len(errors[name])
        if not self.corruptions:
            return figures
        all_errors = [e for name in errors for e in errors[name]]
        figures["robust/corruption_acc"] = 1 - sum(all_errors) / len(all_errors)
        if parent is not None:
            all_parent = [e for name in parent_errors for e in parent_errors[name]]
            figures["robust/parent_corruption_acc"] = 1 - sum(all_parent) / len(all_parent)
            figures["robust/mce"] = mce(errors, parent_errors)
            figures["robust/relative_mce"] = relative_mce(errors, 1 - clean, parent_errors, 1 - parent_clean)
        return figures

    # --- adversarial: white-box FGSM and PGD against each net on the first adversarial_samples test images

    def _adversarial(self, net, parent, datamodule, device, mean, std) -> dict[str, Any]:
        batches = [((inputs.float() * std + mean).clamp_(0, 1), targets.to(device))
                   for inputs, targets in self._batches(datamodule.test_dataloader(), device, self.adversarial_samples)]
        figures: dict[str, Any] = {}
        for prefix, model in (("", net), ("parent_", parent)):
            if model is None:
                continue
            forward = pixel_forward(model, datamodule.mean, datamodule.std)
            generator = torch.Generator().manual_seed(_stream_seed(self.seed, "pgd"))
            attacks = {}
            if self.fgsm:
                attacks["fgsm"] = lambda x, y: fgsm(forward, x, y, self.epsilon)
            if self.pgd_steps:
                attacks["pgd"] = lambda x, y: pgd(forward, x, y, self.epsilon, self.pgd_step_size, self.pgd_steps,
                                                  self.pgd_random_start, generator)
            for attack_name, attack in attacks.items():
                correct = total = 0
                for pixels, targets in batches:
                    adversarial = attack(pixels, targets)
                    with torch.no_grad():
                        correct += int((forward(adversarial).argmax(1) == targets).sum())
                    total += len(targets)
                figures[f"robust/{prefix}{attack_name}_acc"] = correct / total if total else math.nan
        return figures


__all__ = ["Robustness", "mce", "relative_mce", "fgsm", "pgd", "pixel_forward"]
