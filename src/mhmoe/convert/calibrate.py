"""Calibration: fit each converted layer to the module it replaced, on that module's recorded inputs and outputs.

Record first (`capture_ffn_io` on the model before converting: a dense FFN, another library's MoE block or
this library's own SparseMoE), convert (`moeify`, `moe_to_mhmoe`), then `calibrate`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhmoe.convert.wrap import converted_layer
from mhmoe.layers.moe import MoELayer, MoEOutput


def capture_ffn_io(model: nn.Module, batches: Iterable[Any], names: list[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """Run `model(batch)` for each batch (no gradients) and record the (input, output) rows of the named FFN
    modules: {name: ((N, D) inputs, (N, D) outputs)}. Call it on the model before converting it. A module
    returning a `MoEOutput` (this library's layers) is recorded by its output `y`."""
    records: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in names}
    hooks = []
    for name in names:

        def hook(module: nn.Module, args: tuple, output: Any, name: str = name) -> None:
            x = args[0]
            y = output.y if isinstance(output, MoEOutput) else output
            records[name].append((x.detach().reshape(-1, x.shape[-1]), y.detach().reshape(-1, x.shape[-1])))

        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for h in hooks:
            h.remove()
    return {n: (torch.cat([x for x, _ in r]), torch.cat([y for _, y in r])) for n, r in records.items()}


def relative_error(y: Tensor, reference: Tensor) -> float:
    """‖y − reference‖ / ‖reference‖ over all rows (Frobenius)."""
    y, reference = y.detach().float(), reference.detach().float()
    return float((y - reference).norm() / reference.norm().clamp_min(1e-30))


def calibrate(
    model: nn.Module,
    io: dict[str, tuple[Tensor, Tensor]],
    *,
    steps: int = 200,
    lr: float = 1e-3,
    batch_rows: int = 1024,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, tuple[float, float]]:
    """Fit each converted layer (a MoEFFN, or a SparseMoE / MHMoE, at a name of `io`) to the recorded outputs of
    the module it replaced (mean squared error plus the layer's aux loss, Adam), layer by layer on that module's
    recorded inputs.

    Returns {name: (relative error before, after)} on the recorded rows.
    """
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    report = {}
    for name, (x_ND, y_ND) in tqdm(io.items(), desc="calibrate", disable=not progress):
        layer = converted_layer(model, name)
        was_training = layer.training
        layer.train()
        before = _layer_error(layer, x_ND, y_ND)
        opt = torch.optim.Adam(layer.parameters(), lr=lr)
        for _ in range(steps):
            rows = torch.randint(0, x_ND.shape[0], (min(batch_rows, x_ND.shape[0]),), generator=generator)
            out = layer(x_ND[rows])
            loss = F.mse_loss(out.y.float(), y_ND[rows].float()) / y_ND[rows].float().square().mean() + out.aux_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        report[name] = (before, _layer_error(layer, x_ND, y_ND))
        layer.train(was_training)
    return report


@torch.no_grad()
def _layer_error(layer: MoELayer, x_ND: Tensor, y_ND: Tensor) -> float:
    return relative_error(layer(x_ND).y, y_ND)
