"""transformers' own experts implementations against `experts_implementation="mhmoe"` (`mhmoe.hf.experts`), in
whole transformers models on the CPU: training (forward + backward of the loss) and `generate` tokens/s.

    python benchmarks/experts_backend.py --out benchmarks/results/NAME.json [--repeats 6] [--shapes mixtral,...]

Scaled-down one-layer models of each class (D = 256; coarse: a few wide experts, Mixtral-style; fine-grained:
many narrow ones, OLMoE-, Qwen3-MoE- and DeepSeek-V3-style), float32, random weights. For each model, each
implementation ("eager", the per-expert loop; "grouped_mm"; "batched_mm", which gathers every routed row's
expert weights; "mhmoe") runs on a copy with the same weights. Before timing, each copy's logits, loss and every
parameter gradient are compared with eager's (max relative error, which must be < 1e-4), and its greedy
`generate` tokens must equal eager's. Then all are timed round-robin, the order rotated every round, each timed call after an untimed one of the same
implementation (`time_rotated`):
    train     forward + backward of the LM loss on B × L tokens
    generate  `generate(prompt, max_new_tokens=N, do_sample=False)` with the KV cache, B prompts
and each round's time is divided by mhmoe's of the same round; the tables quote the medians of those ratios
("× mhmoe" > 1: mhmoe faster) and the median tokens/s. The machine is shared: the load average is recorded
before and after, and only ratios within one run are quoted.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import mhmoe.hf  # noqa: F401  (registers experts_implementation "mhmoe")
from mhmoe.bench.timing import environment, max_rel_difference, time_interleaved
from mhmoe.train.allocator import tune_cpu_allocator

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm", "mhmoe")
COMMON = dict(hidden_size=256, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
              max_position_embeddings=512)  # fmt: skip
SHAPES: dict[str, tuple[str, Callable[[], torch.nn.Module]]] = {
    "mixtral": ("coarse", lambda: MixtralForCausalLM(MixtralConfig(
        **COMMON, intermediate_size=768, num_local_experts=8, num_experts_per_tok=2))),
    "olmoe": ("fine", lambda: OlmoeForCausalLM(OlmoeConfig(
        **COMMON, intermediate_size=128, num_experts=64, num_experts_per_tok=8))),
    "qwen3-moe": ("fine", lambda: Qwen3MoeForCausalLM(Qwen3MoeConfig(
        **COMMON, intermediate_size=768, moe_intermediate_size=96, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, head_dim=64))),
    "deepseek-v3": ("fine", lambda: DeepseekV3ForCausalLM(DeepseekV3Config(
        **COMMON, intermediate_size=768, moe_intermediate_size=64, n_routed_experts=128, num_experts_per_tok=8,
        n_group=8, topk_group=4, n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=64, q_lora_rank=None,
        qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64))),
}  # fmt: skip
TOLERANCE = 1e-4  # float32, max relative error against eager


def models(name: str) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    base = SHAPES[name][1]()
    found = {}
    for impl in IMPLEMENTATIONS:
        twin = copy.deepcopy(base)
        twin.set_experts_implementation(impl)
        found[impl] = twin
    return found


def train_step(model: torch.nn.Module, idx: torch.Tensor) -> list[torch.Tensor]:
    """Forward + backward of the LM loss; the logits, the loss and every parameter gradient."""
    model.zero_grad(set_to_none=True)
    out = model(idx, labels=idx)
    out.loss.backward()
    return [out.logits.detach(), out.loss.detach()] + [p.grad for p in model.parameters() if p.grad is not None]


def generate(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def time_rotated(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Round-robin timing (`time_interleaved`, one call each per round), the order rotated every round, and each
    timed call preceded by an untimed call of the same function: batched_mm allocates and frees gigabytes (its
    gathered weights), and whatever ran right after it was measured 3-6× slower, so no timed call follows
    another implementation directly."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fns[name]()  # untimed: absorbs what the previous implementation left behind
            times[name].extend(time_interleaved({name: fns[name]}, torch.device("cpu"), 1, warmup=0)[name])
    return times


def median_ratios(times: dict[str, list[float]]) -> dict[str, float]:
    """Per implementation, the median over rounds of its time / mhmoe's time in the same round."""
    return {impl: statistics.median(t / m for t, m in zip(ts, times["mhmoe"])) for impl, ts in times.items()}


def bench(name: str, args: argparse.Namespace) -> dict:
    impls = models(name)
    idx = torch.randint(0, COMMON["vocab_size"], (args.batch, args.length))
    prompt = torch.randint(0, COMMON["vocab_size"], (args.gen_batch, args.prompt))
    reference = train_step(impls["eager"], idx)
    errors = {impl: max_rel_difference(train_step(m, idx), reference) for impl, m in impls.items()}
    bad = {impl: e for impl, e in errors.items() if not e < TOLERANCE}
    assert not bad, f"{name}: outputs or gradients differ from eager: {bad}"
    tokens = generate(impls["eager"], prompt, args.new_tokens)
    for impl, m in impls.items():
        assert torch.equal(generate(m, prompt, args.new_tokens), tokens), f"{name}/{impl}: generate differs from eager"
    rows = []
    for what, fns, count in (
        ("train", {i: lambda m=m: train_step(m, idx) for i, m in impls.items()}, idx.numel()),
        ("generate", {i: lambda m=m: generate(m, prompt, args.new_tokens) for i, m in impls.items()},
         args.gen_batch * args.new_tokens),
    ):  # fmt: skip
        times = time_rotated(fns, args.repeats)
        ratios = median_ratios(times)
        for impl in impls:
            rows.append(dict(what=what, impl=impl, tokens_per_s=count / statistics.median(times[impl]),
                             vs_mhmoe=ratios[impl], times_ms=[round(1e3 * t, 2) for t in times[impl]],
                             max_rel_error=errors[impl]))  # fmt: skip
    config = impls["eager"].config
    experts = next(m for m in impls["eager"].modules() if type(m).__name__.endswith("Experts"))
    shape = dict(kind=SHAPES[name][0], d_model=config.hidden_size, num_experts=experts.num_experts,
                 top_k=config.num_experts_per_tok, expert_hidden=experts.intermediate_dim)  # fmt: skip
    return dict(name=name, shape=shape, rows=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=6, help="rounds")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--batch", type=int, default=2, help="training sequences")
    parser.add_argument("--length", type=int, default=128, help="training sequence length")
    parser.add_argument("--gen-batch", type=int, default=4, help="generate: prompts")
    parser.add_argument("--prompt", type=int, default=16, help="generate: prompt length")
    parser.add_argument("--new-tokens", type=int, default=16, help="generate: new tokens per prompt")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    load_before = os.getloadavg()
    results = [bench(name, args) for name in args.shapes.split(",")]
    env = dict(environment(torch.device("cpu")), transformers=transformers.__version__, cpus=os.cpu_count(),
               load_average_before=load_before, load_average_after=os.getloadavg())  # fmt: skip
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "shapes")}
    report = dict(environment=env, settings=settings, benchmarks=results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("| model | kind | E × F, top-k | impl | train tok/s | × mhmoe | generate tok/s | × mhmoe | max rel. error |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for result in results:
        s = result["shape"]
        train = {r["impl"]: r for r in result["rows"] if r["what"] == "train"}
        gen = {r["impl"]: r for r in result["rows"] if r["what"] == "generate"}
        for impl in train:
            t, g = train[impl], gen[impl]
            print(f"| {result['name']} | {s['kind']} | {s['num_experts']} × {s['expert_hidden']}, {s['top_k']} | "
                  f"{impl} | {t['tokens_per_s']:,.0f} | {t['vs_mhmoe']:.2f} | {g['tokens_per_s']:,.0f} | "
                  f"{g['vs_mhmoe']:.2f} | {t['max_rel_error']:.1e} |")  # fmt: skip


if __name__ == "__main__":
    main()
