"""torch.distributed as launched by torchrun: one process per GPU (or CPU share), same script.

    torchrun --nproc_per_node 2 train.py flowers

Without torchrun every function here behaves as a world of one process.
"""
import ctypes
import os
import signal
import sys
from collections.abc import Iterator
from itertools import islice

import torch.distributed as dist

PR_SET_PDEATHSIG = 1  # prctl(2)


def init_distributed(device):
    """Join the process group torchrun describes (nccl on CUDA, gloo on the CPU); True if joined."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=(
        device if device.type == "cuda" else None))
    return True  # the processes on one machine share its cores: utils.threads


def end_with_launcher():
    """Under torchrun on Linux, have this process get SIGTERM when the launcher dies: a rank
    left running after a kill -9 of torchrun would go on writing while a rerun reads."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def per_process(batch_size):
    """Each process's share of a batch: --batch_size is the global batch, so N processes take
    the steps one process takes, each step averaging N shares' gradients (DDP)."""
    return max(1, batch_size // world_size())


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def shard(items):
    """This process's share of items: every world_size()-th one from its rank on, so the
    shares are disjoint, cover every item once, and need no padding. A list or tensor is
    sliced; an iterator is streamed (itertools.islice), holding nothing."""
    if isinstance(items, Iterator):
        return islice(items, rank(), None, world_size())
    return items[rank()::world_size()]


def is_main():
    return rank() == 0


def gather_objects(value):
    """Every rank's value, in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def close_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()
