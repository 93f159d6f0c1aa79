"""Seeding: Python, NumPy, torch, the loader's shuffle and every worker's augmentations."""
import os
import random
import signal

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        # Needed by cuBLAS for deterministic matmuls on CUDA >= 10.2
        # (https://docs.nvidia.com/cuda/cublas/#results-reproducibility).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def seed_transforms(dataset, seed: int) -> None:
    """Reseed a dataset's Albumentations pipeline.

    Albumentations 2.x draws from its own generators, not from NumPy's global
    state, so seeding NumPy does not reach it; without this every forked worker
    would replay the same augmentations, epoch after epoch.
    """
    transform = getattr(dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed % 2**32)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive every RNG from the worker's torch seed.

    torch gives each worker ``base_seed + worker_id``, and the base seed is drawn
    from the loader's generator, so the seeds follow from ``--seed`` and the epoch.
    """
    # a forked worker inherits the main process's SIGTERM handler (utils/signals.py); a worker
    # simply ends on SIGTERM, the main process reports the stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    seed_transforms(torch.utils.data.get_worker_info().dataset, seed)


def set_epoch(loader, seed: int, epoch: int, rank: int = 0) -> None:
    """Make an epoch's shuffle and augmentations a function of (seed, epoch) alone.

    That is what lets a resumed run repeat exactly what an uninterrupted one does.
    Under torchrun the shuffle is shared (DistributedSampler, seeded by ``seed`` and
    the epoch) and ``rank`` gives each process its own augmentations.
    """
    epoch_seed = seed * 10_000 + epoch
    if hasattr(loader, "set_epoch"):  # utils.gpu_aug.DeviceLoader
        loader.set_epoch(seed, epoch)
        return
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, torch.utils.data.DistributedSampler):
        sampler.seed, sampler.epoch = seed, epoch
    loader.generator.manual_seed(epoch_seed + 1_000_003 * rank)
    if loader.num_workers == 0:
        seed_transforms(loader.dataset, epoch_seed + 1_000_003 * rank)
