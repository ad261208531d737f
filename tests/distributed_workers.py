"""Worker functions for tests/test_distributed.py: each runs in W spawned processes (gloo, CPU).

A job groups several checks, so a suite of a few jobs covers everything: starting processes is the
expensive part on 2 cores. `launch` starts the processes from a forkserver that has imported torch once,
gives each a FileStore rendezvous and a deadline, and returns what every rank wrote as JSON.

The reference for every check is one process on the global batch, computed on each rank from the same
seed (the models are tiny). The losses are chosen so that one process's loss is the mean of the ranks'
losses: L_ref = (1/W) Σ_r L_r with L_r = (W/N) Σ_(rank r's tokens) f + aux, N global tokens.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PRELOAD = ["torch", "torch.distributed.checkpoint", "torch.distributed.fsdp", "mhmoe.parallel", "mhmoe.models.gpt"]


NO_BARRIER = "_no_barrier"


class JobFailed(AssertionError):
    pass


def launch(fn, world: int, tmp: Path, timeout_s: float, *args, pg_timeout_s: float = 60) -> list[dict]:  # type: ignore[no-untyped-def]
    """Run fn(rank, world, out_dir, *args) on `world` processes; each rank's dict result, in rank order.

    Raises JobFailed with the failing rank's traceback, or when the job runs past timeout_s (then the
    processes are killed: a test never hangs). pg_timeout_s: the process group's collective timeout.
    """
    try:
        multiprocessing.set_forkserver_preload(PRELOAD + [__name__])
    except (ValueError, RuntimeError):  # the forkserver already runs
        pass
    out = tmp / f"job-{fn.__name__}-{time.monotonic_ns()}"
    out.mkdir(parents=True)
    entry_args = (fn, world, out, pg_timeout_s, args)
    ctx = mp.start_processes(_entry, args=entry_args, nprocs=world, join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                raise JobFailed(f"{fn.__name__} on {world} processes did not finish within {timeout_s} s")
    except mp.ProcessRaisedException as e:
        raise JobFailed(f"{fn.__name__} on {world} processes failed:\n{e}") from None
    except mp.ProcessExitedException as e:
        raise JobFailed(f"{fn.__name__} on {world} processes: {e}") from None
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _entry(rank: int, fn, world: int, out: Path, timeout: float, args: tuple) -> None:  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    # layers return views (y.view(x.shape)); we never modify them in place, which is what FSDP2 warns about
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    store = dist.FileStore(str(out / "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
    try:
        result = fn(rank, world, out, *args)
    except Exception:
        traceback.print_exc()
        raise
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if not result.get(NO_BARRIER):  # jobs whose peers are gone cannot meet again
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- layers


def _layer(kind: str, router: str, num_experts: int, recompute: bool = False):  # type: ignore[no-untyped-def]
    """kind: smoe (D = 8), mhmoe (D = 16, 2 heads), or the family's latent (LatentMoE, D = 8 at latent width 6) and
    mh-latent (Multi-Head LatentMoE, D = 16, latent width 24, 2 heads with their own routers and pools)."""
    from mhmoe import MHMoE, SparseMoE

    torch.manual_seed(0)
    common = dict(num_experts=num_experts, top_k=2, expert_hidden=16, router=router, z_loss_coef=1e-3)
    common["recompute"] = recompute
    if kind == "mhmoe":
        return MHMoE(d_model=16, num_heads=2, **common)
    if kind == "mh-latent":
        return MHMoE(d_model=16, num_heads=2, latent_dim=24, per_head_experts=True, **common)
    if kind == "latent":
        return SparseMoE(d_model=8, latent_dim=6, **common)
    return SparseMoE(d_model=8, **common)


def _width(kind: str) -> int:
    return 16 if kind in ("mhmoe", "mh-latent") else 8


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def layer_case(rank: int, world: int, case: dict) -> dict:
    """One layer, forward + backward at expert size case["expert"], against one process; max abs diffs."""
    from mhmoe.layers.routers import SigmoidRouter
    from mhmoe.parallel import finish_gradients, make_layout, parallelize, update_router_biases

    reference = _layer(case["kind"], case["router"], case["num_experts"], case.get("recompute", False))
    if case.get("one_rank"):  # every (sub-)token picks experts of rank 0: the others' experts get nothing
        bias = reference.moe.router.expert_bias if case["kind"] == "mhmoe" else reference.router.expert_bias
        bias[case["num_experts"] // case["expert"] :] = -100.0
    model = copy.deepcopy(reference)
    d = _width(case["kind"])
    x = torch.randn(case["tokens"], d, generator=torch.Generator().manual_seed(1))
    g = torch.randn(case["tokens"], d, generator=torch.Generator().manual_seed(2))
    # rows of each rank: equal shards, or all on rank 0 ("empty_ranks": the others have no tokens)
    sizes = [case["tokens"]] + [0] * (world - 1) if case.get("empty_ranks") else [case["tokens"] // world] * world
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])

    x_ref = x.clone().requires_grad_()
    out_ref = reference(x_ref)
    ((out_ref.y * g).sum() / case["tokens"] + out_ref.aux_loss).backward()

    layout = make_layout(case["expert"], "cpu", case["data"])
    forward = parallelize(model, layout, balance="global")
    x_local = x[rows].clone().requires_grad_()
    out = forward(x_local)
    ((out.y * g[rows]).sum() * world / case["tokens"] + out.aux_loss).backward()
    finish_gradients(model, layout)

    counts = out.stats.tokens_per_expert.clone()
    dist.all_reduce(counts)
    diffs = {
        "y": _max_diff(out.y, out_ref.y[rows]),
        "x_grad": _max_diff(x_local.grad / world, x_ref.grad[rows]),
        "aux_loss": _max_diff(out.aux_loss, out_ref.aux_loss),
        "tokens_per_expert": _max_diff(counts, out_ref.stats.tokens_per_expert),
    }
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        grad = _full(p.grad)  # the whole gradient, gathered from the shards (FSDP and experts)
        diffs[f"grad:{name}"] = _max_diff(grad, ref_params[name].grad)
    if case["router"] == "sigmoid":  # bias step on global loads: same on every rank, same as one process
        update_router_biases(model)
        for m_ref in reference.modules():
            if isinstance(m_ref, SigmoidRouter):
                m_ref.update_bias()
        biases = [m.expert_bias for m in model.modules() if isinstance(m, SigmoidRouter)]
        ref_biases = [m.expert_bias for m in reference.modules() if isinstance(m, SigmoidRouter)]
        diffs["router_bias"] = max(_max_diff(a, b) for a, b in zip(biases, ref_biases))
    return {
        "diffs": diffs,
        "aux_loss": float(out.aux_loss.detach()),
        "counts": counts.tolist(),
        "local_tokens": sizes[rank],
    }


def head_case(rank: int, world: int, case: dict) -> dict:
    """A Multi-Head LatentMoE layer with its heads over case["head"] ranks (head parallelism through
    `mhmoe.parallel.parallelize`; each head's experts over case["expert"] ranks; data-parallel over the rest),
    forward + backward, against one process on the global
    batch, float64: max abs differences; and a second identical step, to show the run is bitwise repeatable."""
    from mhmoe import MHMoE, MoEConfig
    from mhmoe.parallel import finish_gradients, make_layout, parallelize

    torch.manual_seed(0)
    config = MoEConfig.from_kwargs(num_experts=4, top_k=2, expert_hidden=8, num_heads=case["heads"], latent_dim=24,
                       per_head_experts=True, z_loss_coef=1e-2, router=case["router"],
                       token_group=case.get("token_group", "call"), capacity_factor=case.get("capacity"),
                       dispatch=case.get("dispatch", "auto"))  # fmt: skip
    reference = MHMoE(config, d_model=16).double()
    B, L = 2 * world, 5
    x = torch.randn(B, L, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = torch.randn(B, L, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mask = torch.rand(B, L, generator=torch.Generator().manual_seed(3)) > 0.2 if case.get("mask") else None
    rows = slice(rank * 2, rank * 2 + 2)  # each rank's 2 sequences

    x_ref = x.clone().requires_grad_()
    out_ref = reference(x_ref, mask)
    ((out_ref.y * g).sum() / (B * L) + out_ref.aux_loss).backward()

    def step() -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        model = copy.deepcopy(reference)
        layout = make_layout(case.get("expert", 1), "cpu", case.get("data", "ddp"), head=case.get("head", world))
        forward = parallelize(model, layout, balance=case.get("balance", "global"))
        x_local = x[rows].clone().requires_grad_()
        out = forward(x_local, None if mask is None else mask[rows])
        ((out.y * g[rows]).sum() * world / (B * L) + out.aux_loss).backward()
        finish_gradients(model, layout)
        grads = {n: _full(p.grad).clone() for n, p in model.named_parameters()}
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
        return grads, out.y.detach(), x_local.grad, out.aux_loss.detach(), local

    grads, y, x_grad, aux, local_params = step()
    aux_mean = aux.clone()
    dist.all_reduce(aux_mean)
    diffs = {"y": _max_diff(y, out_ref.y[rows]), "x_grad": _max_diff(x_grad / world, x_ref.grad[rows]),
             "aux_loss (mean over ranks)": _max_diff(aux_mean / world, out_ref.aux_loss)}  # fmt: skip
    ref = dict(reference.named_parameters())
    diffs.update({f"grad:{name}": _max_diff(grad, ref[name].grad) for name, grad in grads.items()})
    again = step()
    repeatable = torch.equal(again[1], y) and all(torch.equal(again[0][n], grads[n]) for n in grads)
    return {"diffs": diffs, "repeatable": repeatable, "local_params": local_params,
            "params": sum(p.numel() for p in reference.parameters()),
            "expert_params": sum(p.numel() for p in reference.moe.experts.parameters())}  # fmt: skip


def head_job(rank: int, world: int, out: Path, cases: list[dict]) -> dict:
    return {case["name"]: head_case(rank, world, case) for case in cases}


def layout_errors_job(rank: int, world: int, out: Path) -> dict:
    """The one-line ConfigErrors of layouts head parallelism cannot honour, by what they are about."""
    from mhmoe import MHMoE
    from mhmoe.errors import ConfigError
    from mhmoe.parallel import make_layout, parallelize

    attempts = {
        "world": lambda: make_layout(1, "cpu", head=4),
        "with expert": lambda: make_layout(2, "cpu", head=2),  # 2 × 2 ranks needed
        "shared pool": lambda: parallelize(
            MHMoE(d_model=8, num_heads=2, num_experts=4, top_k=2, expert_hidden=8), make_layout(1, "cpu", head=2)
        ),
    }
    errors = {}
    for name, attempt in attempts.items():
        try:
            attempt()
        except ConfigError as e:
            errors[name] = str(e)
    return errors


def layer_job(rank: int, world: int, out: Path, cases: list[dict]) -> dict:
    return {case["name"]: layer_case(rank, world, case) for case in cases}


# -------------------------------------------------------------------------------------------- training


def tiny_config(corpus: Path, *overrides: str):  # type: ignore[no-untyped-def]
    """The cpu-tiny MH-MoE GPT, fp32 on CPU, 10 steps, a loss record every step, checkpoints at 5 and 10."""
    from mhmoe.train.config import apply_overrides, preset

    cfg = preset("cpu-tiny")
    cfg.data.path = str(corpus)
    base = [
        "train.max_steps=10",
        "train.log_every=1",
        "train.eval_every=100",
        "train.eval_batches=2",
        "train.final_eval_batches=2",
        "train.checkpoint_every=5",
        "train.keep_checkpoints=3",
        "train.device=cpu",
        "train.precision=fp32",
        "model.ffn.moe.num_experts=8",
        "model.ffn.moe.router.kind=sigmoid",
    ]
    return apply_overrides(cfg, base + list(overrides))


def train_job(rank: int, world: int, out: Path, corpus: str, cache: str, run_dir: str, overrides: list[str]) -> dict:
    """`mhmoe.train.lm.train` as torchrun would run it, in the process group `launch` made."""
    from mhmoe.train.lm import train

    os.environ["MHMOE_CACHE"] = cache
    started = time.perf_counter()
    result = train(tiny_config(Path(corpus), *overrides), Path(run_dir), progress=False)
    return {"step": result.step, "val_loss": result.valid["loss"], "seconds": time.perf_counter() - started}


def masked_config(data: str, text: str, *overrides: str):  # type: ignore[no-untyped-def]
    """The tiny masked multimodal run, fp32 on CPU, 4 steps, a loss record every step, checkpoints at 2 and 4."""
    from mhmoe.experiments.multimodal.config import apply_masked_overrides, masked_preset

    base = [f"data.path={data}", f"data.text={text}", "data.fashion_limit=100", "train.log_every=1",
            "train.checkpoint_every=2", "train.keep_checkpoints=3", "train.device=cpu", "train.precision=fp32",
            "model.ffn.moe.router.kind=softmax"]  # fmt: skip
    return apply_masked_overrides(masked_preset("tiny"), base + list(overrides))


def masked_train_job(
    rank: int, world: int, out: Path, data: str, text: str, cache: str, run_dir: str, overrides: list[str]
) -> dict:
    """The masked multimodal task on the one training loop, as torchrun would run it."""
    from mhmoe.experiments.multimodal.task import train_masked

    os.environ["MHMOE_CACHE"] = cache
    result = train_masked(masked_config(data, text, *overrides), Path(run_dir), progress=False)
    return {"step": result.step, "tokens_seen": result.tokens_seen}


def load_job(rank: int, world: int, out: Path, checkpoint: str, expert: int, head: int = 1) -> dict:
    """Load a distributed checkpoint at expert size `expert` (or head size `head`): logits on a fixed batch vs the
    consolidated file."""
    from mhmoe.models.gpt import GPT
    from mhmoe.parallel import make_layout, parallelize
    from mhmoe.train.checkpoint import load_model_weights
    from mhmoe.train.config import RunConfig
    from mhmoe.train.dcp import load_distributed

    path = Path(checkpoint)
    cfg = RunConfig.from_dict(json.loads((path.parent.parent / "config.json").read_text()))
    torch.manual_seed(123)  # weights unlike the checkpoint's, so loading must change every one of them
    model = GPT(cfg.model)
    plain = copy.deepcopy(model)
    parallelize(model, make_layout(expert, "cpu", head=head))
    state = load_distributed(path, model)
    load_model_weights(path, plain)  # safetensors only: no torch.distributed involved
    x = torch.randint(0, cfg.model.vocab_size, (3, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model.eval()(x).logits
        expected = plain.eval()(x).logits
    if rank == 0:
        torch.save(logits, out / "logits.pt")
    return {"logits_vs_consolidated": _max_diff(logits, expected), "step": state["step"], "logits_dir": str(out)}


# ---------------------------------------------------------------------------------------------- failure


def dying_job(rank: int, world: int, out: Path, parallel: str = "expert") -> dict:
    """Rank 1 dies (os._exit, like a crash) before the first expert (or head) exchange; rank 0, waiting in it,
    must get an error by itself, within the process-group timeout, instead of hanging."""
    from mhmoe import MHMoE, SparseMoE
    from mhmoe.parallel import make_layout, parallelize

    torch.manual_seed(0)
    if parallel == "head":  # a Multi-Head LatentMoE layer, its 2 heads on the 2 ranks
        layer = MHMoE(d_model=8, num_heads=2, latent_dim=8, per_head_experts=True, num_experts=4, top_k=2,
                      expert_hidden=8)  # fmt: skip
        forward = parallelize(layer, make_layout(1, "cpu", head=world))
    else:
        layer = SparseMoE(d_model=8, num_experts=4, top_k=2, expert_hidden=8)
        forward = parallelize(layer, make_layout(world, "cpu"))
    if rank == 1:
        (out / "rank1.json").write_text(json.dumps({"died": True}))
        os._exit(0)
    started = time.perf_counter()
    try:
        forward(torch.randn(4, 8)).y.sum().backward()
    except RuntimeError as e:
        return {"error": str(e).splitlines()[0][:300], "seconds": time.perf_counter() - started, NO_BARRIER: True}
    return {"error": None, NO_BARRIER: True}


def hanging_job(rank: int, world: int, out: Path) -> dict:
    """Rank 1 never joins the collective (it sleeps past the process-group timeout): the others must time out."""
    if rank == 1:
        time.sleep(120)
    dist.all_reduce(torch.ones(1))
    return {}


def crash_during_save_job(rank: int, world: int, out: Path, run_dir: str) -> dict:
    """Save step 1 of a tiny GPT; then rank 1 dies in the middle of saving step 2 (after its DCP shard)."""
    from mhmoe.models.gpt import GPT, GPTConfig
    from mhmoe.parallel import make_layout, parallelize
    from mhmoe.train import dcp as pc

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, seq_len=16, d_model=16, n_layers=2, n_heads=2)
    cfg.ffn.kind, cfg.ffn.num_experts, cfg.ffn.expert_hidden = "smoe", 4, 16
    model = GPT(cfg)
    parallelize(model, make_layout(world, "cpu"))
    optimizer = torch.optim.AdamW(model.parameters())
    directory = Path(run_dir) / "checkpoints"
    pc.save_distributed(directory, 1, model, optimizer, {"note": "complete"})
    if rank == 1:
        pc._save_rng = lambda folder, rank: os._exit(0)  # dies after writing its DCP shard of step 2
        (out / "rank1.json").write_text(json.dumps({"died": True}))
    try:
        pc.save_distributed(directory, 2, model, optimizer, {"note": "never published"})
    except RuntimeError as e:
        return {"error": str(e).splitlines()[0][:200], NO_BARRIER: True}
    return {"error": None, NO_BARRIER: True}


def stop_job(rank: int, world: int, out: Path, corpus: str, cache: str, run_dir: str, reference: str) -> dict:
    """Rank 1 alone gets SIGTERM (a real signal, sent to itself) during its third optimiser step: every rank must
    stop after the same step and save it together; then the run is resumed to its end, as is an uninterrupted
    run in `reference`. Returns each rank's stop line and the losses of both runs."""
    import signal

    from mhmoe.errors import Interrupted
    from mhmoe.train.lm import train

    os.environ["MHMOE_CACHE"] = cache
    train(tiny_config(Path(corpus)), Path(reference), progress=False)
    original, steps = torch.optim.AdamW.step, [0]

    def step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        steps[0] += 1
        if rank == 1 and steps[0] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    torch.optim.AdamW.step = step
    try:
        train(tiny_config(Path(corpus)), Path(run_dir), progress=False)
        stopped = None
    except Interrupted as e:
        stopped = {"signum": e.signum, "message": e.message}
    finally:
        torch.optim.AdamW.step = original
    latest = (Path(run_dir) / "checkpoints" / "latest").read_text().strip()
    train(tiny_config(Path(corpus)), Path(run_dir), progress=False)
    losses = {name: [json.loads(line).get("loss") for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]
              for name, d in (("losses", run_dir), ("reference_losses", reference))}  # fmt: skip
    return {"stopped": stopped, "latest": latest, **losses}
