"""Weight refit: the policy's weights, bucket by bucket, into a separate generation engine.

The policy sends what a Hugging Face checkpoint of it would hold: its state dict's names
(``get_model_state_dict``, as checkpoints and exports), parameters and persistent buffers, each
tied weight once (``lm_head.weight`` is left out when the embeddings are tied: the engine ties
it again), LoRA adapters merged into their layers' weights under the base model's names (the
engine runs the plain model), every tensor full (unsharded) and floating-point ones in the
compute dtype. The tensors are grouped, in state-dict order, into buckets of at most
``bucket_bytes`` (``weight_buckets``); a bucket travels as one flat ``uint8`` buffer plus its
``BucketLayout`` (name, shape, dtype and byte offset of each tensor), so a transport moves one
buffer per bucket whatever the dtypes:

- ``object`` (CPU, tests): policy rank 0's buffer goes to every engine worker as a Ray object.
- ``cuda_ipc`` (engines colocated with the policy): each policy worker shares its buffer with
  the engine worker on the same GPU through a CUDA IPC handle (``share_cuda_buffer``); nothing
  is copied between GPUs.
- ``nccl`` (engines on GPUs of their own): policy rank 0 broadcasts the buffer to the engine's
  workers over a NCCL group of their own (``VllmWorker.init_refit_group``).

Every policy worker gathers each tensor (FSDP2's all-gather), so a worker holds at most one
bucket plus one tensor beyond its shards.
"""

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor

from rl_toolkit.models.lora import LoraWeight, lora_scalings, merge_lora
from rl_toolkit.utils.hf_export import tied_parameter_names

# Every tensor of a bucket starts at a multiple of this many bytes, so that its view of the flat
# buffer is aligned for any dtype (and for vectorised CUDA copies).
ALIGN_BYTES = 256

# A CUDA IPC handle of a buffer: torch's rebuild function and its arguments (picklable).
CudaIpcHandle = tuple[Callable[..., torch.Tensor], tuple[Any, ...]]


class TensorSpec(NamedTuple):
    """Where one tensor lies in a bucket's flat buffer."""

    name: str  # the Hugging Face state dict key
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # bytes from the buffer's start, a multiple of ALIGN_BYTES


@dataclass(frozen=True)
class BucketLayout:
    """The tensors of one bucket, in order, and the size of its flat buffer in bytes."""

    tensors: tuple[TensorSpec, ...]
    nbytes: int

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.tensors]


def _aligned(num_bytes: int) -> int:
    return -(-num_bytes // ALIGN_BYTES) * ALIGN_BYTES


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def weight_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of ``named_tensors`` whose packed size is at most ``bucket_bytes``.

    The packed size counts each tensor aligned to ``ALIGN_BYTES`` (``bucket_layout``). A tensor
    larger than ``bucket_bytes`` is a bucket of its own. Only shapes and dtypes are read, so
    meta tensors plan the buckets of weights that are not gathered yet.
    """
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        tensor_bytes = _aligned(_nbytes(tensor))
        if bucket and size + tensor_bytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += tensor_bytes
    if bucket:
        yield bucket


def bucket_layout(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> BucketLayout:
    """The layout of a bucket holding ``named_tensors`` in order (shapes and dtypes only)."""
    specs, offset = [], 0
    for name, tensor in named_tensors:
        specs.append(TensorSpec(name, tuple(tensor.shape), tensor.dtype, offset))
        offset += _aligned(_nbytes(tensor))
    return BucketLayout(tuple(specs), offset)


def tensor_view(buffer: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """The tensor ``spec`` inside a bucket's flat ``uint8`` buffer (a view: writes go through)."""
    num_bytes = torch.Size(spec.shape).numel() * torch.empty((), dtype=spec.dtype).element_size()
    return buffer[spec.offset : spec.offset + num_bytes].view(spec.dtype).view(spec.shape)


def unpack_bucket(layout: BucketLayout, buffer: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every tensor of a bucket, as views of ``buffer``."""
    assert buffer.dtype == torch.uint8 and buffer.numel() == layout.nbytes, (
        f"a {layout.nbytes}-byte bucket, got {buffer.numel()} {buffer.dtype} elements"
    )
    return [(spec.name, tensor_view(buffer, spec)) for spec in layout.tensors]


# ---------------------------------------------------------------------------------------------
# The policy side


# What a refit sends of one name: a tensor (a DTensor shard or a plain buffer) or an adapted
# layer's weight that merges when gathered.
RefitTensor = torch.Tensor | LoraWeight


def refit_state_dict(hf_model: nn.Module) -> dict[str, RefitTensor]:
    """The tensors a refit sends, by Hugging Face name, as this rank holds them (DTensor shards
    for FSDP2 parameters, plain tensors for buffers, ``LoraWeight`` for LoRA layers): the state
    dict of the plain model, without tied duplicates."""
    tied = set(tied_parameter_names(hf_model))
    state = cast(dict[str, torch.Tensor], get_model_state_dict(hf_model))  # a model's: tensors
    merged = merge_lora(state, lora_scalings(hf_model))
    return {name: value for name, value in merged.items() if name not in tied}


def refit_dtype(tensor: RefitTensor, compute_dtype: torch.dtype) -> torch.dtype:
    """Floating-point tensors go in the compute dtype (the engine's); others keep their own."""
    return compute_dtype if tensor.is_floating_point() else tensor.dtype


def plan_refit(
    state: dict[str, RefitTensor], compute_dtype: torch.dtype, bucket_bytes: int
) -> list[BucketLayout]:
    """The buckets of a refit of ``state`` (``refit_state_dict``); no collective, no copy."""
    meta = (
        (name, torch.empty(value.shape, dtype=refit_dtype(value, compute_dtype), device="meta"))
        for name, value in state.items()
    )
    return [bucket_layout(bucket) for bucket in weight_buckets(meta, bucket_bytes)]


def gather_bucket(
    state: dict[str, RefitTensor], layout: BucketLayout, device: torch.device
) -> torch.Tensor:
    """The flat buffer of one bucket on ``device``, full tensors in their refit dtype.

    Collective: every rank all-gathers each sharded tensor in the bucket's order (so all ranks
    must call it with the same layout), and every rank returns the same buffer.
    """
    buffer = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
    for spec in layout.tensors:
        value = state[spec.name]
        full = value.full_tensor() if isinstance(value, DTensor | LoraWeight) else value
        tensor_view(buffer, spec).copy_(full)  # casts to the refit dtype, moves to `device`
    return buffer


# ---------------------------------------------------------------------------------------------
# CUDA IPC (colocated engines; GPU only)


def share_cuda_buffer(buffer: torch.Tensor) -> CudaIpcHandle:
    """A handle another process on the same GPU opens with ``open_cuda_buffer``.

    The sender must keep ``buffer`` alive (and unchanged) until the receiver is done with it.
    Both processes must see the GPU under the same index: a Ray actor sees only its own GPU, as
    ``cuda:0``, and colocated actors share their bundle's GPU.
    """
    assert buffer.is_cuda, "CUDA IPC shares GPU memory only"
    from torch.multiprocessing.reductions import reduce_tensor

    torch.cuda.synchronize(buffer.device)  # the gather's copies are done before anyone reads
    rebuild, args = reduce_tensor(buffer)
    return rebuild, args


def open_cuda_buffer(handle: CudaIpcHandle) -> torch.Tensor:
    """The buffer behind a ``share_cuda_buffer`` handle, without copying it."""
    rebuild, args = handle
    return rebuild(*args)
