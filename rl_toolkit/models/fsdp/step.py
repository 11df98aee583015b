"""The optimizer step of a sharded model: global gradient norm, clipping, update, schedule."""

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    max_grad_norm: float | None,
) -> dict[str, float]:
    """Clip the gradients to ``max_grad_norm`` (None: no clipping), step, zero the gradients.

    Returns:
        ``grad_norm`` (of the whole model, before clipping) and ``lr`` (the rate this step used).
    """
    params = [p for p in model.parameters() if p.grad is not None]
    # Every p in params has a gradient; the condition says so to the type checker.
    grads = [p.grad for p in params if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()  # sharded gradients give a partial norm
    if max_grad_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, grad_norm, foreach=True)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": float(grad_norm), "lr": float(lr)}
