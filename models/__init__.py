"""netcompress models: importing this package registers the CIFAR nets in timm's registry.

After ``import netcompress.models``, ``timm.create_model("resnet56_cifar", num_classes=10)`` works anywhere:
resnet{20,32,44,56,110}_cifar (He et al. 2016), vgg{11,13,16,19}_bn_cifar (Liu et al. 2017
network slimming), conv{2,4,6}_lth (Frankle & Carbin 2019).
"""
from . import cifar_resnet, cifar_vgg, lth_conv  # noqa: F401  (registration side effect)
from . import lenet  # noqa: F401  (lenet300_100, the Deep Compression preset's net)
from .factory import create_model, first_and_last_layer_names, model_input_size

__all__ = ["create_model", "first_and_last_layer_names", "model_input_size"]
