"""LightningDataModules built by Hydra from ``conf/data/<name>.yaml``.

Every datamodule exposes ``num_classes``, ``input_size`` (3, H, W), ``mean``, ``std`` right after
construction, and ``train_dataloader`` / ``val_dataloader`` / ``test_dataloader``.
"""
from netcompress.datamodules.cifar10 import CIFAR10DataModule
from netcompress.datamodules.imagefolder import ImageFolderDataModule, ImageNetDataModule
from netcompress.datamodules.synthetic import SyntheticDataModule
from netcompress.datamodules.tensor_datamodule import TensorDataModule
from netcompress.datamodules.tensor_loader import AugmentedTensorLoader

__all__ = [
    "AugmentedTensorLoader",
    "CIFAR10DataModule",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "SyntheticDataModule",
    "TensorDataModule",
]
