"""OmegaConf resolvers of the config tree, registered on import (run.py and the tests import this).

``${launch_dir:}`` is the folder run.py was started from. Unlike ``${hydra:runtime.cwd}`` it also
resolves where no HydraConfig is set, as in the multirun process itself, which builds
``hydra.sweep.dir`` from ``paths.log_dir`` before any job runs.
"""
from __future__ import annotations

import os

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf


def launch_dir() -> str:
    """Hydra's runtime.cwd inside a job (also on a cluster node), else this process's working directory."""
    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.cwd)
    return os.getcwd()


OmegaConf.register_new_resolver("launch_dir", launch_dir, replace=True)
