"""Knowledge distillation from frozen teachers (Hinton et al. 2015), with FitNets / attention hints.

Training loss of the student (the task weight and the extra term go through the module's
contract, ``set_task_loss_weight`` and ``add_loss_term``):

    loss = ce_weight * CE(student, labels) + kd_weight * T^2 * KL(p_T || softmax(student / T))

where p_T is the teacher's softmax(logits / T), or the mean of several teachers' (an ensemble).
Defaults T = 4, ce_weight = 0.1, kd_weight = 0.9 are RepDistiller's (Tian et al. 2020,
"Contrastive Representation Distillation": ``-r 0.1 -a 0.9``, T = 4; their ``alpha``, ``-a``, is
the KD weight). Optionally a feature term is added:

* ``feature_loss: fitnets`` (Romero et al. 2015): MSE between a learned 1x1-conv adapter of a
  student feature map and the teacher's; the adapters are registered with
  ``register_aux_module`` (trained with the student, saved in checkpoints, never exported);
* ``feature_loss: attention`` (Zagoruyko & Komodakis 2017): distance of normalised spatial
  attention maps; no parameters, any channel counts (so it survives slimming).

Teachers (``callbacks.kd.teachers``) are plain attributes of this callback, not modules of the
LightningModule: they are in no optimizer and not in the student's checkpoint (their sources are
recorded instead, in this callback's state and in results.json as ``kd/teachers``). They run
in eval mode under ``torch.inference_mode`` on the student's device and precision.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from netcompress.compression.checks import plain
from netcompress.compression.distillation_losses import (attention_loss, fitnets_loss, kd_loss, make_adapter,
                                             teacher_probabilities)
from netcompress.compression.layer_selection import select_layers
from netcompress.compression.teachers import INITIAL, check_sources, kind_of, load_teacher
from netcompress.lightning_modules.contract import require_contract

KEY = "callbacks.kd"  # where conf/compression/kd.yaml lands (# @package callbacks)
FEATURE_LOSSES = ("fitnets", "attention")
# RepDistiller's weights (beta) of the feature terms: FitNets 100, attention transfer 1000.
DEFAULT_FEATURE_WEIGHT = {"fitnets": 100.0, "attention": 1000.0}
ADAPTERS = "kd_adapters"


def _number(value: Any, key: str, low: float, high: float | None, low_open: bool, what: str) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        raise ValueError(f"`{key}` must be {what}; got {value!r}")
    return float(value)


def _names(value: Any, key: str) -> list[str]:
    value = plain(value)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"`{key}` must be a list of module-name patterns (e.g. [layer1, layer2, layer3]); got {value!r}")
    return list(value)


def resolve_layers(net: nn.Module, patterns: list[str], key: str) -> list[str]:
    """Module names matching ``patterns`` (each may match several, e.g. 'layer?'), in module order."""
    chosen = select_layers(net, include=patterns, skip_first_last=False, types=(nn.Module,), key=key)
    return [name for name in chosen if name]


def feature_shapes(net: nn.Module, names: list[str], input_size: Sequence[int], key: str) -> list[torch.Size]:
    """Output shapes of the named modules for one dummy input (eval mode, no BN statistics change)."""
    shapes: dict[str, torch.Size] = {}
    handles = [net.get_submodule(name).register_forward_hook(
        lambda module, args, out, name=name: shapes.__setitem__(name, out.shape)) for name in names]
    param = next(net.parameters())
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, *input_size, device=param.device, dtype=param.dtype))
    finally:
        net.train(was_training)
        for handle in handles:
            handle.remove()
    for name in names:
        if name not in shapes or len(shapes[name]) != 4:
            got = tuple(shapes[name]) if name in shapes else "nothing (module not called in forward)"
            raise ValueError(f"`{key}`: layer '{name}' must output an N x C x H x W feature map; got {got}")
    return [shapes[name] for name in names]


def reject_alpha(alpha: Any) -> None:
    """Refuse the removed ``alpha`` key: its meaning (the CE weight) was the reverse of the papers'."""
    if alpha is None:
        return
    hint = ""
    if not isinstance(alpha, bool) and isinstance(alpha, (int, float)):
        hint = f" (for the old alpha={alpha}: {KEY}.ce_weight={alpha} {KEY}.kd_weight={1 - alpha:g})"
    raise ValueError(f"`{KEY}.alpha` was removed; got alpha={alpha!r}. It weighed the cross-entropy term "
                     f"(loss = alpha * CE + (1 - alpha) * KD), the reverse of the usual convention (RepDistiller's "
                     f"alpha, -a, weighs the KD term). "
                     f"Set `{KEY}.ce_weight` (cross-entropy weight, default 0.1) and `{KEY}.kd_weight` "
                     f"(distillation weight, default 0.9) instead{hint}, and drop alpha")


class KD(pl.Callback):
    """Distil one teacher or an ensemble into the student through an extra loss term.

    Args:
        teachers: one source or a list (ensemble): a run's ``.ckpt`` / ``model.pt`` (thinned nets
            included), a timm model name, or ``initial`` (a frozen copy of the student at fit
            start: with ``init_from`` the dense parent teaches its pruned/slimmed version).
        temperature: softmax temperature T (> 0); the KL term is multiplied by T^2.
        ce_weight: weight of the cross-entropy with the labels, in [0, 1] (RepDistiller's ``-r``).
        kd_weight: weight of the T^2-scaled KL term, >= 0 (RepDistiller's ``alpha``, ``-a``).
        alpha: removed (it weighed the cross-entropy, the reverse of RepDistiller's alpha); setting it
            raises an error that says which of ce_weight / kd_weight to set instead.
        pretrained: timm-name teachers load their pretrained weights (must be available offline);
            false builds a random teacher (smoke tests only).
        teacher_kwargs: extra ``create_model`` arguments for timm-name teachers.
        feature_loss: null, ``fitnets`` or ``attention``: add a feature-map term (one teacher only).
        student_layers: module-name patterns of the student's hinted feature maps (``layer?``).
        teacher_layers: the teacher's, paired in order (default: the same patterns).
        feature_weight: weight of the feature term; null = RepDistiller's (fitnets 100, attention 1000).
    """

    # one loss term named "kd" (an ensemble is several teachers); rules: pipeline/combinations.py
    CAPABILITIES = frozenset({"single"})

    def __init__(self, teachers: Any, temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9,
                 pretrained: bool = True, teacher_kwargs: dict | None = None, feature_loss: str | None = None,
                 student_layers: Any = None, teacher_layers: Any = None,
                 feature_weight: float | None = None, alpha: Any = None) -> None:
        super().__init__()
        reject_alpha(alpha)
        self.sources = check_sources(plain(teachers), f"{KEY}.teachers")
        self.temperature = _number(temperature, f"{KEY}.temperature", 0.0, None, True, "a number > 0 (e.g. 4)")
        self.ce_weight = _number(ce_weight, f"{KEY}.ce_weight", 0.0, 1.0, False,
                                 "in [0, 1] (the weight of the cross-entropy with the labels, e.g. 0.1)")
        self.kd_weight = _number(kd_weight, f"{KEY}.kd_weight", 0.0, None, False,
                                 "a number >= 0 (the weight of the T^2 * KL distillation term, e.g. 0.9)")
        if not isinstance(pretrained, bool):
            raise ValueError(f"`{KEY}.pretrained` must be true or false; got {pretrained!r}")
        self.pretrained = pretrained
        teacher_kwargs = plain(teacher_kwargs) or {}
        if not isinstance(teacher_kwargs, dict):
            raise ValueError(f"`{KEY}.teacher_kwargs` must be a mapping of create_model arguments; got {teacher_kwargs!r}")
        self.teacher_kwargs = teacher_kwargs
        if feature_loss in ("none", "null", ""):
            feature_loss = None
        if feature_loss is not None and feature_loss not in FEATURE_LOSSES:
            raise ValueError(f"`{KEY}.feature_loss` must be one of null, {', '.join(FEATURE_LOSSES)}; got {feature_loss!r}")
        self.feature_loss = feature_loss
        if self.ce_weight == 0 and self.kd_weight == 0 and feature_loss is None:
            raise ValueError(f"`{KEY}.ce_weight` and `{KEY}.kd_weight` are both 0, so the loss would be 0; "
                             "set at least one of them > 0 (defaults 0.1 and 0.9)")
        self.student_patterns = _names(student_layers, f"{KEY}.student_layers")
        self.teacher_patterns = _names(teacher_layers, f"{KEY}.teacher_layers") or list(self.student_patterns)
        if feature_loss is not None:
            if not self.student_patterns:
                raise ValueError(f"`{KEY}.student_layers` must name at least one layer when "
                                 f"feature_loss={feature_loss}; e.g. [layer3] or ['layer?']")
            if len(self.sources) != 1:
                raise ValueError(f"`{KEY}.feature_loss={feature_loss}` needs exactly one teacher; got "
                                 f"{len(self.sources)} in {KEY}.teachers")
        elif student_layers or teacher_layers:
            raise ValueError(f"`{KEY}.student_layers`/`teacher_layers` are set but `{KEY}.feature_loss` is null; "
                             f"set feature_loss to one of {', '.join(FEATURE_LOSSES)}")
        if feature_weight is None:
            feature_weight = DEFAULT_FEATURE_WEIGHT.get(feature_loss, 0.0)
        self.feature_weight = _number(feature_weight, f"{KEY}.feature_weight", 0.0, None, False, "a number >= 0")
        self.teachers: list[nn.Module] = []  # plain list: not submodules of the LightningModule
        self.described: list[str] = []
        self._loaded_state: dict | None = None
        self._student_names: list[str] = []
        self._teacher_names: list[str] = []
        self._student_feats: list[torch.Tensor | None] = []
        self._teacher_feats: list[torch.Tensor | None] = []
        self._student_handles: list = []
        self._teacher_handles: list = []
        self._hooked: list[nn.Module] = []
        self._capture = False
        self._cache: tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]] | None = None

    # ----- checks before training -----------------------------------------------------------
    def _describe(self, source: str) -> str:
        kind = kind_of(source)
        if kind == "path":
            return str(Path(source).resolve())
        if kind == "timm":
            return f"timm:{source}" + ("" if self.pretrained else " (random init)")
        return INITIAL

    # ----- surgery: teachers, loss terms, adapters --------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        require_contract(pl_module, type(self).__name__, ('net', 'add_loss_term', 'remove_loss_term', 'set_task_loss_weight', 'register_aux_module', 'report_result', 'set_parent'))
        if stage != "fit":
            return
        student = pl_module.net
        # Loading here (before checkpoint restore and before any other callback's surgery, which
        # happens in on_train_start or later) makes 'initial' the student as fit starts.
        self.teachers = [load_teacher(s, student, self.pretrained, self.teacher_kwargs, f"{KEY}.teachers")
                         for s in self.sources]
        self.described = [self._describe(s) for s in self.sources]
        if hasattr(pl_module, "set_parent"):  # the (first) teacher is the dense parent evaluators compare with
            pl_module.set_parent(self.teachers[0], source=f"kd:{self.described[0]}")
        pl_module.set_task_loss_weight(self.ce_weight)
        pl_module.remove_loss_term("kd")
        pl_module.add_loss_term("kd", self._kd_term, weight=self.kd_weight)
        if self.feature_loss is not None:
            self._setup_features(trainer, pl_module)
        pl_module.report_result("kd/teachers", list(self.described))

    def _setup_features(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from netcompress.models.factory import model_input_size

        student, teacher = pl_module.net, self.teachers[0]
        self._student_names = resolve_layers(student, self.student_patterns, f"{KEY}.student_layers")
        self._teacher_names = resolve_layers(teacher, self.teacher_patterns, f"{KEY}.teacher_layers")
        if len(self._student_names) != len(self._teacher_names):
            raise ValueError(f"`{KEY}.student_layers` selects {len(self._student_names)} layers "
                             f"({self._student_names}) but `{KEY}.teacher_layers` selects "
                             f"{len(self._teacher_names)} ({self._teacher_names}); they are paired in order")
        input_size = tuple(getattr(trainer.datamodule, "input_size", None) or model_input_size(student))
        s_shapes = feature_shapes(student, self._student_names, input_size, f"{KEY}.student_layers")
        t_shapes = feature_shapes(teacher, self._teacher_names, input_size, f"{KEY}.teacher_layers")
        if self.feature_loss == "fitnets":
            wanted = [(s[1], t[1]) for s, t in zip(s_shapes, t_shapes)]
            if ADAPTERS in pl_module.aux:  # a second fit of the same module keeps its trained adapters
                have = [(a.in_channels, a.out_channels) for a in pl_module.aux[ADAPTERS]]
                if have != wanted:
                    raise ValueError(f"{KEY}: the module already has FitNets adapters {have}, this fit needs {wanted}")
            else:
                pl_module.register_aux_module(ADAPTERS, nn.ModuleList(make_adapter(s, t) for s, t in wanted))
        pl_module.remove_loss_term("kd_hint")
        pl_module.add_loss_term("kd_hint", self._feature_term, weight=self.feature_weight)
        self._teacher_feats = [None] * len(self._teacher_names)
        self._teacher_handles = [teacher.get_submodule(name).register_forward_hook(self._store(self._teacher_feats, i))
                                 for i, name in enumerate(self._teacher_names)]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After strategy.setup: the student is on its device and in its precision; so go the teachers.
        plugin = trainer.strategy.precision_plugin
        memory_format = getattr(pl_module, "memory_format", torch.preserve_format)
        self.teachers = [plugin.convert_module(t).to(device=pl_module.device, memory_format=memory_format)
                         for t in self.teachers]
        if self._loaded_state is not None and self._loaded_state.get("teachers") != self.described:
            rank_zero_warn(f"{KEY}: resuming with teachers {self.described} but the checkpoint was trained with "
                           f"{self._loaded_state.get('teachers')}")

    # ----- hooks on the student's feature maps -------------------------------------------------
    @staticmethod
    def _store(bucket: list, index: int):
        def hook(module, args, output):
            bucket[index] = output
        return hook

    def _student_hook(self, index: int):
        def hook(module, args, output):
            if self._capture:
                self._student_feats[index] = output
        return hook

    def _attach_student_hooks(self, net: nn.Module) -> None:
        """(Re-)hook the named student layers; called when the net or a hooked layer was replaced."""
        try:
            modules = [net.get_submodule(name) for name in self._student_names]
        except AttributeError as exc:
            raise ValueError(f"`{KEY}.student_layers`: layer missing after the network was replaced "
                             f"(slimming / QAT?): {exc}") from exc
        if len(modules) == len(self._hooked) and all(a is b for a, b in zip(modules, self._hooked)):
            return
        self._remove_student_hooks()
        self._student_feats = [None] * len(modules)
        self._student_handles = [m.register_forward_hook(self._student_hook(i)) for i, m in enumerate(modules)]
        self._hooked = modules

    def _remove_student_hooks(self) -> None:
        for handle in self._student_handles:
            handle.remove()
        self._student_handles, self._hooked = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._student_names:
            self._attach_student_hooks(pl_module.net)
            self._capture = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._capture = False
        self._cache = None
        self._student_feats = [None] * len(self._student_feats)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._remove_student_hooks()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._remove_student_hooks()
            for handle in self._teacher_handles:
                handle.remove()
            self._teacher_handles, self.teachers = [], []  # free the teachers' memory
            self._cache = None

    # ----- loss terms ---------------------------------------------------------------------------
    def _teach(self, inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Soft targets (and hooked feature maps) of the teachers for this batch, computed once per step."""
        if self._cache is not None and self._cache[0] is inputs:
            return self._cache[1], self._cache[2]
        with torch.inference_mode():
            probs = teacher_probabilities([teacher(inputs) for teacher in self.teachers], self.temperature)
            feats = list(self._teacher_feats)
        # Inference tensors cannot be saved for backward: clone into ordinary (grad-free) tensors.
        probs, feats = probs.clone(), [f.clone() for f in feats]
        self._teacher_feats[:] = [None] * len(self._teacher_feats)
        self._cache = (inputs, probs, feats)
        return probs, feats

    def _kd_term(self, ctx) -> torch.Tensor:
        probs, _ = self._teach(ctx.inputs)
        return kd_loss(ctx.logits, probs, self.temperature)

    def _feature_term(self, ctx) -> torch.Tensor:
        _, teacher_feats = self._teach(ctx.inputs)
        total = ctx.logits.new_zeros((), dtype=torch.float32)
        for i, (student, teacher) in enumerate(zip(self._student_feats, teacher_feats)):
            if student is None:
                raise RuntimeError(f"{KEY}: student layer '{self._student_names[i]}' produced no output this step")
            if self.feature_loss == "fitnets":
                adapter = ctx.module.aux[ADAPTERS][i]
                if student.shape[1] != adapter.in_channels:
                    raise ValueError(
                        f"`{KEY}.student_layers`: '{self._student_names[i]}' now has {student.shape[1]} channels "
                        f"but its FitNets adapter takes {adapter.in_channels} (the net was thinned during fit); "
                        f"use {KEY}.feature_loss=attention (any width) or hint a layer whose width is kept")
                total = total + fitnets_loss(adapter(student), teacher)
            else:
                total = total + attention_loss(student, teacher)
        return total

    # ----- state: the teachers' sources (weights are never saved with the student) -------------
    def state_dict(self) -> dict[str, Any]:
        return {"teachers": list(self.described), "temperature": self.temperature, "ce_weight": self.ce_weight,
                "kd_weight": self.kd_weight, "feature_loss": self.feature_loss}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_state = dict(state_dict)
