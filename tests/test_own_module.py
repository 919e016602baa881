"""netcompress's callbacks in a user's own LightningModule and training loop (README: "The callbacks
in your own LightningModule"): mix in CompressionContract, and MagnitudePruning and KD work with a
plain Trainer and DataLoader; without the contract they refuse clearly before training."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from netcompress import models  # noqa: F401  (registers the CIFAR nets in timm)
from netcompress.callbacks.kd import KD
from netcompress.callbacks.magnitude_pruning import MagnitudePruning
from netcompress.lightning_modules.contract import CompressionContract


class MyModule(CompressionContract, pl.LightningModule):
    """A user's module: its own net, loss, optimizer; the mixin is all netcompress asks for."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.init_compression_contract()

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        return self.compression_loss(F.cross_entropy(logits, y), x, y, logits)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loader(n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=g)


def trainer(callbacks) -> pl.Trainer:
    return pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)


def test_magnitude_pruning_and_kd_in_a_plain_lightning_loop(tmp_path):
    torch.manual_seed(0)
    net = timm.create_model("resnet20_cifar", num_classes=10, width=0.5)
    teacher = timm.create_model("resnet20_cifar", num_classes=10)
    teacher_file = tmp_path / "teacher.pt"
    from netcompress.models.serialization import save_model

    save_model(teacher, teacher_file, "resnet20_cifar", 10, {})
    module = MyModule(net)
    pruning = MagnitudePruning(sparsity=0.6, include=["layer*"])
    kd = KD(teachers=str(teacher_file), temperature=4.0, ce_weight=0.1, kd_weight=0.9)
    fit = trainer([pruning, kd])
    fit.fit(module, loader())
    pruned = [m.weight for name, m in net.named_modules()
              if name.startswith("layer") and isinstance(m, torch.nn.Conv2d)]
    zeros = sum(int((w == 0).sum()) for w in pruned) / sum(w.numel() for w in pruned)
    assert zeros == pytest.approx(0.6, abs=1e-3)  # the pruning callback held its masks through training
    assert module.task_loss_weight == pytest.approx(0.1) and "kd" in module._loss_terms
    assert float(fit.callback_metrics["train/kd"]) > 0  # the KD term was added (and logged) every step
    assert module.extra_results["compress/sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert module.parent is not None  # the teacher is the student's parent for evaluators


def test_a_module_without_the_contract_is_refused_before_training():
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = timm.create_model("resnet20_cifar", num_classes=10, width=0.25)

        def training_step(self, batch, batch_idx):
            raise AssertionError("must not train")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match="MagnitudePruning needs a LightningModule with the compression contract.*"
                                        "CompressionContract"):
        trainer([MagnitudePruning(sparsity=0.5)]).fit(Plain(), loader())
