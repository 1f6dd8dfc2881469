"""Training on several processes under torchrun: the process group (env.py), the per-rank data order
(sampler.py) and DistributedDataParallel over the trainable parameters only (ddp.py)."""

from .env import Dist, DistributedError, LaunchEnv, launch_env, process_group

__all__ = ["Dist", "DistributedError", "LaunchEnv", "launch_env", "process_group"]
