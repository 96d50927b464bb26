"""Sharding (FSDP2) and activation checkpointing of the networks, for ``ModelParallelStrategy``.

``FlowMapDistillModule.configure_model`` calls ``shard_network`` on the student (and, by default,
on the frozen teacher and guide) when Lightning's ``ModelParallelStrategy`` gives it a device
mesh: every block of the network (each entry of its ``nn.ModuleList``/``nn.ModuleDict``
containers) becomes one FSDP2 unit, then the network itself. Parameters are sharded along the
mesh's ``data_parallel`` dimension and gathered one block at a time in the forward pass, also
inside the JVP (``torch.func.jvp`` and forward AD run through FSDP2's hooks).

Mixed precision is Lightning's ``precision: bf16-mixed`` (autocast): parameters, gradients and
optimizer state stay fp32, the grad forward/backward runs in bf16, and ``flowmap_lit.jvp``
switches autocast off for the tangent pass, whose error bf16 would amplify; the objectives do
their loss math in fp32.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn


def _block_slots(net: nn.Module) -> list[tuple[nn.Module, str | int, nn.Module]]:
    """``(container, key, block)`` for the outermost entries with parameters of ``net``'s
    ``ModuleList``/``ModuleDict`` containers, in order."""
    slots = []
    for module in net.modules():
        if isinstance(module, nn.ModuleDict):
            slots += [(module, k, c) for k, c in module.items()]
        elif isinstance(module, nn.ModuleList):
            slots += [(module, i, c) for i, c in enumerate(module)]
    slots = [s for s in slots if any(True for _ in s[2].parameters())]
    nested = {id(m) for _, _, b in slots for m in b.modules() if m is not b}
    return [s for s in slots if id(s[2]) not in nested]


def network_blocks(net: nn.Module) -> list[nn.Module]:
    """The blocks of ``net``: the entries of its ``ModuleList``/``ModuleDict`` containers, in order."""
    return [block for _, _, block in _block_slots(net)]


def _checkpoint_when_training(module: nn.Module, *args, **kwargs):
    """``torch.utils.checkpoint`` (non-reentrant) when grad is enabled; a plain call otherwise.

    Without grad there is nothing to recompute, and some torch versions' checkpoint goes through an
    autograd.Function without a forward-AD rule even then, which breaks ``torch.func.jvp``.
    """
    if not torch.is_grad_enabled():
        return module(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(net: nn.Module) -> nn.Module:
    """Recompute each block's activations in the backward pass instead of storing them.

    Uses ``torch.utils.checkpoint`` (non-reentrant) through torch's ``checkpoint_wrapper``, whose
    state-dict hooks keep parameter names unchanged. Without grad (the JVP's tangent pass, sampling)
    a wrapped block is called directly, so the JVP path is unchanged. Apply it before ``shard_network``.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper

    for container, key, block in _block_slots(net):
        if not isinstance(block, CheckpointWrapper):
            container[key] = checkpoint_wrapper(block, checkpoint_fn=_checkpoint_when_training)
    return net


def data_parallel_mesh(mesh):
    """The data-parallel dimension of Lightning's ``ModelParallelStrategy`` mesh (or the mesh itself)."""
    names = mesh.mesh_dim_names or ()
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def shard_network(net: nn.Module, mesh, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 ``fully_shard`` of every block of ``net``, then of ``net`` itself, over ``mesh``."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(net, FSDPModule):
        return net  # configure_model may run again (fit, then validate)
    for block in network_blocks(net):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(net, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return net


def is_sharded(t) -> bool:
    """True for a DTensor (a parameter or state sharded by FSDP2)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t):
    """The whole tensor of a (possibly sharded) DTensor; plain tensors are returned as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like(full, reference):
    """``full`` laid out like ``reference``: sharded the same way if it is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(device=reference.device, dtype=reference.dtype)
    if isinstance(reference, DTensor):
        return distribute_tensor(full, reference.device_mesh, reference.placements)
    return full.clone()
