"""netcompress: config-driven neural-network compression experiments on any timm backbone.

The repository root is the package (pyproject.toml maps ``netcompress`` to ``.``), so the
brief's folders stay at the top and import as ``netcompress.callbacks``, ``netcompress.compression``, ...
Layers point down: run / report -> protocols -> pipeline -> callbacks -> lightning_modules ->
compression / evaluation -> models / datamodules (checked by import-linter, tests/test_layers.py).
"""
__version__ = "0.1.0"
