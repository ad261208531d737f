"""This library's layer against transformers' own MoE blocks, on blocks converted from Mixtral-, Qwen2-MoE- and
Qwen3-MoE-style models (`mhmoe.convert.peers.layer_from_block`): forward + backward, all in one run.

    python benchmarks/peer_experts.py --out benchmarks/results/NAME.json [--repeats 15] [--shapes mixtral,qwen2,qwen3]

For each block: transformers' block with the experts implementations its `ExpertsInterface` offers on the CPU
for training-sized batches ("eager", the per-expert loop, and "grouped_mm"; its third, "batched_mm", gathers
every routed row's expert weights, (T·K, 2F, D) floats: 17 GB for the Mixtral block here, a decoding kernel),
and this library's SparseMoE built from the same block (dispatch "auto": grouped_mm here). Each is first checked
against the eager block (output, input gradient and the router's and experts' weight gradients), then all are
timed round-robin (`time_interleaved`); times are medians of forward + backward of (y · g).sum(), routing included; "× mhmoe" is each time over this library's.
The machine is shared and noisy: only the ratios within one run are quoted.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch
import transformers
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from mhmoe.bench.timing import environment, max_rel_difference, time_interleaved
from mhmoe.convert import find_moe_blocks, layer_from_block
from mhmoe.train.allocator import tune_cpu_allocator

IMPLEMENTATIONS = ("eager", "grouped_mm")
COMMON = dict(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1, vocab_size=128)
SHAPES = {  # (model, tokens): Mixtral-style (8 experts, top-2), Qwen2-MoE-style (shared expert), Qwen3-MoE-style
    # (many small experts, top-8)
    "mixtral": (lambda: MixtralForCausalLM(MixtralConfig(
        **COMMON, hidden_size=512, intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2)), 2048),
    "qwen2": (lambda: Qwen2MoeForCausalLM(Qwen2MoeConfig(
        **COMMON, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, shared_expert_intermediate_size=1024,
        num_experts=32, num_experts_per_tok=4, norm_topk_prob=False)), 2048),
    "qwen3": (lambda: Qwen3MoeForCausalLM(Qwen3MoeConfig(
        **COMMON, hidden_size=512, intermediate_size=1024, moe_intermediate_size=128, num_experts=64,
        num_experts_per_tok=8, norm_topk_prob=True)), 2048),
}  # fmt: skip


def blocks(name: str) -> dict[str, torch.nn.Module]:
    """transformers' block under each experts implementation, and this library's layer, with the same weights."""
    torch.manual_seed(0)
    make, _ = SHAPES[name]
    model = make().eval()
    found = {}
    for impl in IMPLEMENTATIONS:
        twin = copy.deepcopy(model)
        twin.set_experts_implementation(impl)
        found[impl] = find_moe_blocks(twin)[0][1]
    found["mhmoe"] = layer_from_block(found["eager"], model.config)
    return found


def step(module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    """Forward + backward; returns the output, the input gradient and the parameters' gradients."""
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = module(x)
    y = out.y if hasattr(out, "y") else out
    (y * g).sum().backward()
    return [y, x.grad]


def weight_grads(module: torch.nn.Module) -> list[torch.Tensor]:
    """Router and expert weight gradients in this library's layout (the peers reader applied to the gradients)."""
    from mhmoe.convert.peers import read_moe_block

    if hasattr(module, "experts") and hasattr(module.experts, "w_in"):  # this library's SparseMoE
        return [module.router.weight.grad, module.experts.w_in.grad, module.experts.w_out.grad]
    saved = [(p, p.data) for p in module.parameters()]
    for p, _ in saved:
        p.data = p.grad
    try:
        peer = read_moe_block(module)
        assert peer is not None
        return [peer.router_weight.clone(), peer.w_in.clone(), peer.w_out.clone()]
    finally:
        for p, data in saved:
            p.data = data


def bench(name: str, repeats: int) -> dict:
    impls = blocks(name)
    tokens = SHAPES[name][1]
    D = impls["mhmoe"].d_model
    x, g = torch.randn(4, tokens // 4, D), torch.randn(4, tokens // 4, D)
    reference = step(impls["eager"], x, g) + weight_grads(impls["eager"])
    errors = {impl: max_rel_difference(step(m, x, g) + weight_grads(m), reference) for impl, m in impls.items()}
    times = time_interleaved({impl: lambda m=m: step(m, x, g) for impl, m in impls.items()}, x.device, repeats)
    medians = {impl: statistics.median(t) for impl, t in times.items()}
    layer = impls["mhmoe"]
    rows = [dict(impl=impl, ms=1e3 * medians[impl], times_ms=[1e3 * t for t in times[impl]],
                 vs_mhmoe=medians[impl] / medians["mhmoe"], max_rel_error=errors[impl]) for impl in impls]  # fmt: skip
    shape = dict(tokens=tokens, d_model=D, num_experts=layer.num_experts, top_k=layer.top_k,
                 expert_hidden=layer.expert_hidden, shared_hidden=layer.config.shared_expert_hidden)  # fmt: skip
    return dict(name=name, shape=shape, rows=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    tune_cpu_allocator()
    results = [bench(name, args.repeats) for name in args.shapes.split(",")]
    env = dict(environment(torch.device("cpu")), transformers=transformers.__version__)
    report = dict(environment=env, repeats=args.repeats, benchmarks=results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("| block | impl | ms (fwd+bwd) | × mhmoe | max rel. error |")
    print("|---|---|---:|---:|---:|")
    for result in results:
        for r in result["rows"]:
            print(
                f"| {result['name']} | {r['impl']} | {r['ms']:.1f} | {r['vs_mhmoe']:.2f} | {r['max_rel_error']:.1e} |"
            )


if __name__ == "__main__":
    main()
