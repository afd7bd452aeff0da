"""Where a trial runs: its node, host and GPUs (tags of its run), and its torch device.
"""

from __future__ import annotations

import os
import platform
import socket

from study.record.layout import CUDA_VISIBLE_DEVICES_TAG, GPU_IDS_TAG, HOSTNAME_TAG, NODE_ID_TAG, NODE_IP_TAG


def where_am_i() -> dict[str, str]:
    """The node, host, Ray-assigned GPUs and CUDA devices of this process (tags of a trial run)."""
    import ray

    info = {HOSTNAME_TAG: socket.gethostname() or platform.node()}
    if ray.is_initialized():
        context = ray.get_runtime_context()
        info[NODE_ID_TAG] = context.get_node_id()
        info[NODE_IP_TAG] = ray.util.get_node_ip_address()
        gpu_ids = ray.get_gpu_ids()
        if gpu_ids:
            info[GPU_IDS_TAG] = ",".join(str(g) for g in gpu_ids)
            info[CUDA_VISIBLE_DEVICES_TAG] = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return info


def node_name(info: dict[str, str]) -> str:
    """``host (ip, node 1a2b3c4d)`` for error messages."""
    node = info.get(NODE_ID_TAG, "")
    return f"{info.get(HOSTNAME_TAG, '?')} ({info.get(NODE_IP_TAG, '?')}, node {node[:8] or '?'})"


def trial_device(requested: str, info: dict[str, str]) -> str:
    """The torch device of a trial: ``cpu``, or the first CUDA device this process sees. Ray sets
    ``CUDA_VISIBLE_DEVICES`` to the GPU(s) it assigned the trial (``--gpus-per-trial``, also a
    fraction of one), so device 0 is the trial's own; it is made the current device so that
    nothing lands on another trial's GPU."""
    if requested == "cpu":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"node {node_name(info)}: the trial asked for a GPU but torch sees no CUDA device "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    torch.cuda.set_device(0)
    return "cuda:0"
