"""All-to-all bytes of the family under expert and head parallelism: counted in a gloo run, checked against the
counter (`mhmoe.models.cost.all_to_all_values_per_token`).

Two processes on the CPU; one Multi-Head LatentMoE layer (per-head pools) of the 2602.04870 shape scaled down, and
the same layer under expert parallelism (its H·E experts split over the ranks) and under head parallelism (its heads
split). Every `all_to_all_single` call is wrapped to count the values each rank sends to the other rank (its own
block stays home and is not counted), float rows apart from the integer size exchange. Forward pass only; the
backward sends the same again. Head parallelism's count must equal the counter exactly; expert parallelism's depends
on how the routing falls over the ranks, so it is shown beside the counter's even-spread expectation and beside the
exact count from the routing itself.

    python benchmarks/family_bytes.py            # writes benchmarks/results/cpu-<N>core-<date>-family-bytes.json, a table
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD, D, L, H, E, K, F, TOKENS = 2, 64, 64, 8, 8, 2, 32, 256


def _counting(sent: dict[str, float], rank: int, original):  # type: ignore[no-untyped-def]
    def counted(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):  # type: ignore[no-untyped-def]
        rows = input.shape[0]
        splits = input_split_sizes or [rows // WORLD] * WORLD
        per_row = input[0].numel() if rows else 0
        remote = (rows - splits[rank]) * per_row
        key = "float values" if input.is_floating_point() else "integer values"
        sent[key] = sent.get(key, 0) + remote
        return original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    return counted


CASES = {  # name: (parallelism, per-head pools)
    "head, per-head pools": ("head", True),
    "expert, per-head pools": ("expert", True),
    "expert, one shared pool (MH-MoE)": ("expert", False),
}


def _layer(per_head: bool = True):  # type: ignore[no-untyped-def]
    from mhmoe import MHMoE, MoEConfig

    torch.manual_seed(0)
    pools = 1 if per_head else H  # the shared pool holds as many experts as all the per-head pools
    config = MoEConfig(num_experts=E * pools, top_k=K, expert_hidden=F, num_heads=H, latent_dim=L,
                       per_head_experts=per_head)  # fmt: skip
    return MHMoE(config, d_model=D)


def _worker(rank: int, store_path: str, out: str) -> None:
    from mhmoe.parallel import make_layout, parallelize
    from mhmoe.parallel.head import shard_heads

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    x = torch.randn(WORLD * TOKENS, D, generator=torch.Generator().manual_seed(1))[rank * TOKENS : (rank + 1) * TOKENS]
    result = {}
    for name, (parallel, per_head) in CASES.items():
        reference = _layer(per_head)(x).y.detach()
        model = _layer(per_head)
        if parallel == "expert":
            forward = parallelize(model, make_layout(WORLD, "cpu"))
        else:
            forward = shard_heads(model, make_layout(1, "cpu", head=WORLD).mesh)
        sent: dict[str, float] = {}
        original = dist.all_to_all_single
        dist.all_to_all_single = _counting(sent, rank, original)  # type: ignore[assignment]
        try:
            with torch.no_grad():
                out_layer = forward(x)
        finally:
            dist.all_to_all_single = original  # type: ignore[assignment]
        y = out_layer.y
        sent["max abs difference to one process"] = float((y - reference).abs().max())
        if parallel == "expert":  # the exact count from the routing: rows whose expert lives on the other rank
            experts_per_rank = H * E // WORLD
            remote_rows = int((out_layer.stats.top_experts // experts_per_rank != rank).sum())
            sent["float values from the routing"] = 2 * remote_rows * (L // H)
        result[name] = sent
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    from mhmoe.models.cost import all_to_all_values_per_token

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(str(Path(tmp, "store")), tmp), nprocs=WORLD, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(WORLD)]
    rows = []
    for name, (parallel, per_head) in CASES.items():
        config = _layer(per_head).config
        counted = sum(r[name]["float values"] for r in ranks) / (WORLD * TOKENS)
        expected = all_to_all_values_per_token(config, d_model=D, layer="mhmoe", parallel=parallel, size=WORLD)
        row = {"case": name, "counted values per token": counted, "counter": expected,
               "size exchange (integer values per rank per call)": sum(r[name].get("integer values", 0) for r in ranks) / WORLD,
               "max abs difference to one process": max(r[name]["max abs difference to one process"] for r in ranks)}  # fmt: skip
        if parallel == "expert":
            row["from the routing"] = sum(r[name]["float values from the routing"] for r in ranks) / (WORLD * TOKENS)
        rows.append(row)
    head = rows[0]
    if head["counted values per token"] != head["counter"]:
        print(
            f"head parallelism sent {head['counted values per token']} values per token, the counter says {head['counter']}"
        )
        return 1
    report = {
        "what": "all-to-all values sent to other ranks per token, one MH-LatentMoE layer, forward, 2 gloo processes",
        "shape": dict(
            d_model=D, latent_dim=L, num_heads=H, experts_per_head=E, top_k=K, expert_hidden=F, tokens_per_rank=TOKENS
        ),  # fmt: skip
        "rows": rows,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    path = Path(__file__).parent / "results" / f"cpu-{os.cpu_count()}core-{report['date']}-family-bytes.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print("| case | counted values / token | counter | from the routing | size exchange / rank / call |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['counted values per token']:.1f} | {r['counter']:.1f} | "
              f"{r.get('from the routing', '-')} | {r['size exchange (integer values per rank per call)']:.0f} |")  # fmt: skip
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
