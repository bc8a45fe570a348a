"""The few collective operations both trainers need, for any process group or none (one process).

Tokenizer training averages gradients itself (``average_gradients``: one flattened all-reduce per
module) rather than wrapping models in DDP: its step runs two optimizers and takes gradients of
the decoder's last layer twice for the adaptive GAN weight, patterns DDP's reducer does not expect.
Objects travel between our own ranks only (``gather``, ``broadcast``): trusted, pickled by torch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> int:
    return dist.get_world_size() if initialized() else 1


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def gather(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decided_on_rank0(decide, error: type[Exception], what: str):
    """``decide()`` run on rank 0 alone and its answer broadcast, so every rank acts on the same
    one. An exception there is raised on every rank: rank 0's own, the others an ``error`` saying
    rank 0 could not ``what`` (they must not wait for an answer that never comes)."""
    answer = failure = None
    if rank() == 0:
        try:
            answer = decide()
        except Exception as e:
            failure = e
    answer, why = broadcast((answer, None if failure is None else f"{type(failure).__name__}: {failure}"))
    if failure is not None:
        raise failure
    if why is not None:
        raise error(f"rank 0 could not {what} ({why})")
    return answer


def barrier() -> None:
    if initialized():
        dist.barrier()


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (a no-op alone); returns it."""
    if world() > 1:
        dist.all_reduce(t)
    return t


def broadcast_module(module: nn.Module) -> None:
    """Make every rank hold rank 0's parameters and buffers."""
    if world() == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def average_gradients(params) -> None:
    if world() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world()
    for g, s in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(s)


def all_reduce_mean(values: dict[str, float | torch.Tensor], device) -> dict[str, float]:
    """Means over ranks as floats. Values may be floats or 0-dim tensors (logs kept on the device):
    one all-reduce and one read-back for the whole dict."""
    if not values:
        return {}
    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], device=device).detach().reshape(()).double() for k in keys])
    if world() > 1:
        dist.all_reduce(t)
    return {k: v / world() for k, v in zip(keys, t.tolist())}


class DistStatSync:
    """Injected into the EMA quantizer: sum codebook statistics, share restart vectors."""

    def all_reduce_sum(self, t: torch.Tensor) -> None:
        all_reduce_sum_(t)

    def broadcast_from_first(self, t: torch.Tensor) -> None:
        if world() > 1:
            dist.broadcast(t, src=0)
