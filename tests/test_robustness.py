"""Robustness evaluator (evaluation/robustness.py, evaluation/corruptions.py): each corruption against
its reference (scipy, Pillow, colorsys, make_cifar_c's formulas), deterministic from its seed,
severity-monotone and in [0, 1]; FGSM against its closed form on a linear model, PGD against captum's
PGD; mCE / relative mCE against a hand computation; the evaluator from config, with and without a parent."""
from __future__ import annotations

import colorsys
import copy
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from conftest import TINY, compose_config
from netcompress.evaluation import corruptions as C
from netcompress.evaluation.evaluators import build_evaluators, run_evaluators
from netcompress.evaluation.robustness import Robustness, fgsm, mce, pgd, pixel_forward, relative_mce

FAST_NET = ["model.name=lenet300_100"]  # an MLP: the robustness passes cost milliseconds


def fixed_image() -> torch.Tensor:
    """A (1, 3, 32, 32) image with smooth structure and texture, on the uint8 grid, inside (0, 1)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    image = torch.stack([0.5 + 0.3 * torch.sin(6 * xx + 2 * yy), 0.5 + 0.3 * torch.cos(5 * yy), 0.3 + 0.4 * xx * yy])
    image = image + 0.08 * torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(1))
    return (image.clamp(0.02, 0.98) * 255).round()[None] / 255


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----- corruptions ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(C.CORRUPTIONS))
def test_corruptions_are_deterministic_in_range_and_worse_with_severity(name):
    image = fixed_image()
    extremes = image.clone()
    extremes[..., :4, :] = 0.0
    extremes[..., -4:, :] = 1.0  # black and white rows: clipping must hold there too
    distances = []
    for severity in C.SEVERITIES:
        out = C.corrupt(image, name, severity, seeded(0))
        assert out.shape == image.shape and out.dtype == image.dtype
        assert torch.equal(out, C.corrupt(image, name, severity, seeded(0)))  # same seed, same images
        other = C.corrupt(image, name, severity, seeded(1))
        assert torch.equal(out, other) != (name in C.RANDOM)  # a new seed changes only the random ones
        clipped = C.corrupt(extremes, name, severity, seeded(0))
        assert float(clipped.min()) >= 0.0 and float(clipped.max()) <= 1.0
        distances.append(float((out - image).pow(2).mean().sqrt()))
    assert distances[0] > 0
    assert all(a < b for a, b in zip(distances, distances[1:])), distances


def test_severity_constants_are_make_cifar_c_s():
    """hendrycks/robustness ImageNet-C/create_c/make_cifar_c.py, copied here by hand."""
    assert C.GAUSSIAN_NOISE_STD == (0.04, 0.06, .08, .09, .10)
    assert C.SHOT_NOISE_PHOTONS == (500, 250, 100, 75, 50)
    assert C.GAUSSIAN_BLUR_SIGMA == (.4, .6, 0.7, .8, 1)
    assert C.CONTRAST_FACTOR == (.75, .5, .4, .3, 0.15)
    assert C.BRIGHTNESS_SHIFT == (.05, .1, .15, .2, .3)
    assert C.JPEG_QUALITY == (80, 65, 58, 50, 40)
    assert C.PIXELATE_FACTOR == (0.95, 0.9, 0.85, 0.75, 0.65)


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_blur_equals_scipy_gaussian_filter_with_skimage_defaults(severity):
    image = fixed_image().double()
    sigma = C.GAUSSIAN_BLUR_SIGMA[severity - 1]
    reference = scipy.ndimage.gaussian_filter(image[0].numpy(), sigma=(0, sigma, sigma), mode="nearest", truncate=4.0)
    torch.testing.assert_close(C.gaussian_blur(image, severity)[0], torch.from_numpy(reference), rtol=0, atol=1e-12)


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_pixelate_equals_pillow_box_resize(severity):
    """Pillow's BOX resampling of each channel as a float image (mode F: no uint8 rounding in between)."""
    image = fixed_image()
    size = int(32 * C.PIXELATE_FACTOR[severity - 1])
    channels = [Image.fromarray(channel.numpy()).resize((size, size), Image.BOX).resize((32, 32), Image.BOX)
                for channel in image[0]]
    reference = torch.stack([torch.from_numpy(np.array(channel)) for channel in channels])
    torch.testing.assert_close(C.pixelate(image, severity)[0], reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_brightness_equals_the_hsv_round_trip(severity):
    image = fixed_image().double()
    image[0, :, 0, :3] = 0.0  # black pixels turn grey
    shift = C.BRIGHTNESS_SHIFT[severity - 1]
    pixels = image[0].permute(1, 2, 0).reshape(-1, 3).numpy()
    reference = np.array([colorsys.hsv_to_rgb(h, s, min(v + shift, 1.0))
                          for h, s, v in (colorsys.rgb_to_hsv(*p) for p in pixels)])
    ours = C.brightness(image, severity)[0].permute(1, 2, 0).reshape(-1, 3).numpy()
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("severity", C.SEVERITIES)
def test_contrast_equals_make_cifar_c_formula(severity):
    image = fixed_image()
    x = image[0].permute(1, 2, 0).double().numpy()  # HWC, as the original
    c = C.CONTRAST_FACTOR[severity - 1]
    means = np.mean(x, axis=(0, 1), keepdims=True)
    reference = np.clip((x - means) * c + means, 0, 1)
    np.testing.assert_allclose(C.contrast(image, severity)[0].permute(1, 2, 0).numpy(), reference, atol=1e-6)


def test_jpeg_equals_a_pillow_round_trip():
    image = fixed_image()
    buffer = __import__("io").BytesIO()
    Image.fromarray((image[0] * 255).round().byte().permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=58)
    reference = torch.from_numpy(np.array(Image.open(buffer))).permute(2, 0, 1).float() / 255
    assert torch.equal(C.jpeg_compression(image, 3)[0], reference)


def test_noise_corruptions_have_the_papers_statistics():
    grey = torch.full((4, 3, 64, 64), 0.5)  # no clipping at these noise levels
    for severity, std in enumerate(C.GAUSSIAN_NOISE_STD, 1):
        residual = C.gaussian_noise(grey, severity, seeded(0)) - grey
        assert float(residual.mean()) == pytest.approx(0, abs=3e-3)
        assert float(residual.std()) == pytest.approx(std, rel=0.03)
    for severity, photons in enumerate(C.SHOT_NOISE_PHOTONS, 1):
        out = C.shot_noise(grey, severity, seeded(0))
        assert float(out.mean()) == pytest.approx(0.5, abs=3e-3)
        assert float(out.var()) == pytest.approx(0.5 / photons, rel=0.05)  # Poisson(c x) / c: variance x / c
        assert torch.allclose(out * photons, (out * photons).round(), atol=1e-3)  # integer photon counts


def test_bad_corruption_input_is_refused():
    with pytest.raises(ValueError, match="unknown corruption 'fog'; valid: gaussian_noise"):
        C.corrupt(fixed_image(), "fog", 1)
    with pytest.raises(ValueError, match="severity must be an int in 1..5; got 6"):
        C.corrupt(fixed_image(), "contrast", 6)
    with pytest.raises(ValueError, match=r"float images of shape \(N, 3, H, W\)"):
        C.corrupt(fixed_image()[0], "contrast", 1)


# ----- attacks ----------------------------------------------------------------------------------------------

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def linear_setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).eval()
    pixels = torch.rand(6, 3, 4, 4, generator=seeded(2))
    pixels[0, 0, 0, :2] = torch.tensor([0.0, 1.0])  # on the box: the step is clipped there
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    return net, pixels, targets


def test_fgsm_equals_the_closed_form_on_a_linear_model():
    """logits = W (x - m) / s + b: grad_x CE = (W^T (softmax - onehot)) / s, and s > 0 keeps its sign."""
    net, pixels, targets = linear_setup()
    weight, bias = net[1].weight.detach(), net[1].bias.detach()
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    logits = ((pixels - m) / s).flatten(1) @ weight.T + bias
    grad = ((F.softmax(logits, 1) - F.one_hot(targets, 5).float()) @ weight).view_as(pixels) / s
    expected = (pixels + 0.1 * grad.sign()).clamp(0, 1)
    ours = fgsm(pixel_forward(net, MEAN, STD), pixels, targets, 0.1)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    assert not any(p.grad is not None for p in net.parameters())  # the net is left as it was


@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")  # captum's own PGD
def test_pgd_of_one_step_without_random_start_is_fgsm_and_several_steps_equal_captum():
    from captum.robust import PGD

    net, pixels, targets = linear_setup()
    forward = pixel_forward(net, MEAN, STD)
    torch.testing.assert_close(pgd(forward, pixels, targets, 0.1, 0.1, 1, random_start=False),
                               fgsm(forward, pixels, targets, 0.1), rtol=0, atol=0)
    reference = PGD(forward, lambda out, y: F.cross_entropy(out, y, reduction="none"), 0.0, 1.0)
    reference.fgsm.zero_thresh = 0.0
    expected = reference.perturb(pixels.clone().requires_grad_(True), radius=0.05, step_size=0.02, step_num=4,
                                 target=targets)
    ours = pgd(forward, pixels, targets, 0.05, 0.02, 4, random_start=False)
    torch.testing.assert_close(ours, expected.detach(), rtol=0, atol=1e-6)


def test_pgd_random_start_is_seeded_and_stays_in_the_ball():
    net, pixels, targets = linear_setup()
    forward = pixel_forward(net, MEAN, STD)
    one = pgd(forward, pixels, targets, 0.05, 0.01, 3, True, seeded(0))
    assert torch.equal(one, pgd(forward, pixels, targets, 0.05, 0.01, 3, True, seeded(0)))
    assert not torch.equal(one, pgd(forward, pixels, targets, 0.05, 0.01, 3, True, seeded(1)))
    assert float((one - pixels).abs().max()) <= 0.05 + 1e-6 and 0 <= float(one.min()) and float(one.max()) <= 1
    loss = lambda x: float(F.cross_entropy(forward(x).detach(), targets))  # noqa: E731
    assert loss(one) > loss(pixels)  # the attack raises the loss


# ----- corruption errors --------------------------------------------------------------------------------------

def test_mce_and_relative_mce_against_a_hand_computation():
    child = {"a": [0.2, 0.3, 0.5], "b": [0.1, 0.1, 0.2]}
    parent = {"a": [0.4, 0.5, 0.6], "b": [0.2, 0.3, 0.3]}
    # mCE: a -> 1.0 / 1.5, b -> 0.4 / 0.8
    assert mce(child, parent) == pytest.approx((1.0 / 1.5 + 0.4 / 0.8) / 2)
    # relative (clean errors 0.05 and 0.1): a -> (1.0 - 3 * 0.05) / (1.5 - 3 * 0.1), b -> (0.4 - 0.15) / (0.8 - 0.3)
    assert relative_mce(child, 0.05, parent, 0.1) == pytest.approx((0.85 / 1.2 + 0.25 / 0.5) / 2)
    assert math.isnan(mce(child, parent | {"b": [0.0, 0.0, 0.0]}))  # a parent without errors: undefined
    assert math.isnan(relative_mce(child, 0.05, parent | {"b": [0.1, 0.1, 0.1]}, 0.1))


# ----- the evaluator ------------------------------------------------------------------------------------------

def small(*overrides: str) -> list[str]:
    return [*FAST_NET, "evaluation=[robustness]", "evaluators.robustness.corruptions=[contrast,gaussian_noise]",
            "evaluators.robustness.severities=[1,5]", "evaluators.robustness.adversarial_samples=20",
            "evaluators.robustness.pgd_steps=2", *overrides]


def test_an_identical_parent_gives_the_nets_own_figures_and_the_accuracies_are_the_formulas(tiny_config):
    """Parent = a copy of the net: mCE 1 and parent_* equal to the net's; robust/contrast/s5 equals the
    accuracy of the net on the test images corrupted by make_cifar_c's contrast formula, written out here."""
    from netcompress.pipeline.fit import fit_and_test

    cfg = tiny_config(*small("trainer.max_epochs=3"))
    results, objects = fit_and_test(cfg)
    net, datamodule = objects["module"].net, objects["datamodule"]
    figures = run_evaluators(cfg, objects, copy.deepcopy(net))
    again = run_evaluators(cfg, objects, copy.deepcopy(net))
    assert json.dumps(figures, sort_keys=True) == json.dumps(again, sort_keys=True)  # deterministic (the 2nd from the cache) (noise from the seed); NaN == NaN here
    assert figures["robust/clean_acc"] == pytest.approx(results["test/acc1"], abs=1e-9)
    assert figures["robust/mce"] == pytest.approx(1.0)
    for key in ("corruption_acc", "fgsm_acc", "pgd_acc"):
        assert figures[f"robust/parent_{key}"] == figures[f"robust/{key}"]
    expected_keys = {"robust/clean_acc", "robust/corruption_acc", "robust/parent_corruption_acc", "robust/mce",
                     "robust/relative_mce", "robust/fgsm_acc", "robust/pgd_acc", "robust/parent_fgsm_acc",
                     "robust/parent_pgd_acc", "robust/contrast", "robust/gaussian_noise", "robust/parent_clean_acc",
                     *(f"robust/{p}{c}/s{s}" for p in ("", "parent_") for c in ("contrast", "gaussian_noise")
                       for s in (1, 5))}
    assert set(figures) == expected_keys
    per_corruption = [figures[f"robust/{c}/s{s}"] for c in ("contrast", "gaussian_noise") for s in (1, 5)]
    assert figures["robust/corruption_acc"] == pytest.approx(sum(per_corruption) / 4)
    contrast = (figures["robust/contrast/s1"] + figures["robust/contrast/s5"]) / 2
    assert figures["robust/contrast"] == pytest.approx(contrast)

    m, s = torch.tensor(datamodule.mean).view(1, 3, 1, 1), torch.tensor(datamodule.std).view(1, 3, 1, 1)
    correct = total = 0
    net.eval()
    with torch.no_grad():
        for inputs, targets in datamodule.test_dataloader():
            x = (inputs * s + m).clamp(0, 1).permute(0, 2, 3, 1).double().numpy()  # NHWC pixels
            means = x.mean(axis=(1, 2), keepdims=True)
            corrupted = torch.from_numpy(np.clip((x - means) * 0.15 + means, 0, 1)).float().permute(0, 3, 1, 2)
            correct += int((net((corrupted - m) / s).argmax(1) == targets).sum())
            total += len(targets)
    assert figures["robust/contrast/s5"] == pytest.approx(correct / total)
    assert 0.0 <= figures["robust/fgsm_acc"] <= figures["robust/clean_acc"] + 0.05


def test_without_a_parent_only_the_nets_keys_and_one_log_line(tiny_config, caplog):
    from netcompress.pipeline.fit import fit_and_test

    cfg = tiny_config(*small("evaluators.robustness.max_samples=20", "evaluators.robustness.fgsm=false"))
    caplog.set_level(logging.INFO, logger="netcompress.evaluation.robustness")
    results, objects = fit_and_test(cfg)  # runs the evaluators itself, without a parent
    lines = [r for r in caplog.records if r.name == "netcompress.evaluation.robustness"]
    assert len(lines) == 1 and "no parent net" in lines[0].getMessage() and lines[0].levelno == logging.INFO
    robust = {k for k in results if k.startswith("robust/")}
    assert robust == {"robust/clean_acc", "robust/corruption_acc", "robust/pgd_acc", "robust/contrast",
                      "robust/gaussian_noise", *(f"robust/{c}/s{s}" for c in ("contrast", "gaussian_noise")
                                                 for s in (1, 5))}
    assert results["robust/clean_acc"] * 20 == pytest.approx(round(results["robust/clean_acc"] * 20))  # 20 images


def test_a_run_from_init_from_writes_the_robustness_keys(tiny_config, tmp_path):
    from netcompress.run import run

    dense = run(compose_config([*TINY, *FAST_NET, "evaluation=[]"], tmp_path / "dense"))
    assert dense["status"] == "ok"
    cfg = tiny_config(*small(f"init_from={tmp_path / 'dense' / 'model.pt'}"))
    run(cfg)
    saved = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert saved["status"] == "ok"
    for key in ("clean_acc", "corruption_acc", "parent_corruption_acc", "fgsm_acc", "pgd_acc", "parent_fgsm_acc",
                "parent_pgd_acc", "contrast/s1", "gaussian_noise/s5"):
        assert 0.0 <= saved[f"robust/{key}"] <= 1.0, key
    assert saved["robust/mce"] > 0
    assert "robust/relative_mce" in saved  # null if the parent loses nothing to some corruption


@pytest.mark.parametrize("override, match", [
    ("evaluators.robustness.severities=[0,1]", r"`evaluators.robustness.severities` must be .* got \[0, 1\]"),
    ("evaluators.robustness.corruptions=[fog]",
     r"`evaluators.robustness.corruptions` must be .*pixelate.* got \['fog'\]"),
    ("evaluators.robustness.epsilon=8", r"`evaluators.robustness.epsilon` must be a number in \(0, 1\]"),
    ("evaluators.robustness.pgd_steps=-1", r"`evaluators.robustness.pgd_steps` must be an int >= 0; got -1"),
    ("evaluators.robustness.max_samples=0", r"`evaluators.robustness.max_samples` must be an int >= 1; got 0"),
])
def test_bad_robustness_config_fails_before_training(tmp_path, override, match):
    from netcompress.pipeline.build import build

    cfg = compose_config([*TINY, "evaluation=[robustness]", override], tmp_path)
    with pytest.raises(ValueError, match=match):
        build(cfg)  # builds (and checks) the evaluators before the trainer exists


def test_the_config_mirrors_the_constructor(tmp_path):
    import inspect

    cfg = compose_config([*TINY, "evaluation=[robustness]", "seed=3"], tmp_path)
    entry = dict(cfg.evaluators.robustness)
    assert set(entry) - {"_target_"} == set(inspect.signature(Robustness).parameters)
    (evaluator,) = build_evaluators(cfg.evaluators)
    assert evaluator.seed == 3 and evaluator.corruptions == list(C.CORRUPTIONS)
    assert evaluator.epsilon == pytest.approx(8 / 255) and evaluator.pgd_step_size == pytest.approx(2 / 255)


def test_the_parents_figures_are_cached_per_parent_settings_and_test_images(tiny_config, tmp_path):
    """A second job compressing the same parent reads the parent's figures from cache_dir: identical results,
    and the parent runs no forward pass; another parent (or other settings) is not served from the cache."""
    from netcompress.pipeline.fit import fit_and_test

    cfg = tiny_config(*small(f"evaluators.robustness.cache_dir={tmp_path / 'cache'}"))
    _, objects = fit_and_test(cfg)  # its own evaluation has no parent: nothing cached
    assert not (tmp_path / "cache").exists()
    parent = copy.deepcopy(objects["module"].net)
    with torch.no_grad():
        parent.get_classifier().bias.add_(0.5)  # a parent that differs from the net
    cold = run_evaluators(cfg, objects, parent)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    calls = []
    hook = parent.register_forward_hook(lambda *a: calls.append(1))
    warm = run_evaluators(cfg, objects, parent)
    hook.remove()
    assert calls == [] and json.dumps(warm, sort_keys=True) == json.dumps(cold, sort_keys=True)
    with torch.no_grad():
        parent.get_classifier().bias.add_(0.5)
    run_evaluators(cfg, objects, parent)  # other weights: computed, a second file
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2
