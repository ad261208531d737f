"""Scale-out on torch.distributed: expert parallelism, head parallelism (`mhmoe.parallel.head`, make_layout(1, ...,
head=P)), DDP / FSDP2 for the rest, resharding checkpoints.

The layers know nothing of this package: it installs an all-to-all `ExpertRunner` and a global
`loss_reduce` on each SparseMoE from outside. Typical use, one process per device under torchrun:

    device = init_distributed(torch.device("cpu"))            # gloo on CPU, NCCL on CUDA
    layout = make_layout(expert=2, device_type="cpu")          # experts over 2 ranks, data over all
    model = GPT(cfg).to(device)                                # same seed on every rank
    forward = parallelize(model, layout, balance="global")     # DDP wrapper (or model under FSDP2)
    loss = forward(x_local, y_local).loss; loss.backward()
    finish_gradients(model, layout); clip_grad_norm(model, 1.0, layout); optimizer.step()
    update_router_biases(model)                                # sigmoid router, loads summed over ranks
"""

from mhmoe.parallel.expert import AllToAllExperts, expert_parameters, moe_layers, shard_experts, use_global_balance
from mhmoe.parallel.runtime import (
    Layout,
    all_mean,
    clip_grad_norm,
    finish_gradients,
    init_distributed,
    launched_distributed,
    make_layout,
    parallelize,
    shard_rows,
    update_router_biases,
)

__all__ = [
    "AllToAllExperts",
    "Layout",
    "all_mean",
    "clip_grad_norm",
    "expert_parameters",
    "finish_gradients",
    "init_distributed",
    "launched_distributed",
    "make_layout",
    "moe_layers",
    "parallelize",
    "shard_experts",
    "shard_rows",
    "update_router_biases",
    "use_global_balance",
]
