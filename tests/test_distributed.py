"""Expert parallelism, head parallelism, data parallelism and resharding checkpoints on CPU with gloo, 1, 2 and 4
processes (head parallelism's layer-level checks are in tests/test_family.py).

Every check compares W processes with one process on the same global batch (fp32): outputs, input
gradients, every parameter gradient, auxiliary loss, router biases; ten training steps; checkpoints saved
at expert-parallel size 2 and loaded at 1 and 4. Each job runs under a deadline (distributed_workers.launch),
so a hang fails the test instead of stalling the suite. The figures are printed (`pytest -s`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import pack_sample
from distributed_workers import (
    crash_during_save_job,
    dying_job,
    hanging_job,
    launch,
    layer_job,
    load_job,
    masked_config,
    masked_train_job,
    tiny_config,
    train_job,
)

from mhmoe.errors import ConfigError
from mhmoe.experiments.multimodal.task import train_masked
from mhmoe.models.gpt import GPT
from mhmoe.train.checkpoint import latest_checkpoint, load_model_weights, verify
from mhmoe.train.config import RunConfig
from mhmoe.train.lm import train

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
FP32 = 1e-5


def _case(name: str, kind: str, router: str, expert: int, data: str = "ddp", **extra) -> dict:
    return dict(name=name, kind=kind, router=router, num_experts=8, expert=expert, data=data, tokens=32, **extra)


def _check_layers(results: list[dict], world: int) -> dict[str, float]:
    """Every difference within fp32 tolerance on every rank; returns the worst per case (printed)."""
    worst = {}
    for name in results[0]:
        per_rank = [r[name] for r in results]
        for rank, result in enumerate(per_rank):
            bad = {k: v for k, v in result["diffs"].items() if v > FP32}
            assert not bad, f"{name}, rank {rank} of {world}: {bad}"
        assert len({r["aux_loss"] for r in per_rank}) == 1, f"{name}: aux loss differs between ranks"
        worst[name] = max(max(r["diffs"].values()) for r in per_rank)
    print(f"\n{world} processes, max abs difference to one process:", json.dumps(worst, indent=1))
    return worst


def _check_edge_cases(results: list[dict], world: int, expert: int, empty_heads: int) -> None:
    """The edge cases are what they claim: all 32 tokens × top-2 on rank 0's experts; all tokens on rank 0."""
    one, empty = results[0]["one-rank"], results[0]["empty-ranks"]
    local = 8 // expert
    assert sum(one["counts"][:local]) == 32 * 2 and sum(one["counts"][local:]) == 0, one["counts"]
    assert [r["empty-ranks"]["local_tokens"] for r in results] == [32] + [0] * (world - 1)
    assert sum(empty["counts"]) == 32 * empty_heads * 2


def test_layers_two_processes(tmp_path):
    cases = [
        _case("smoe-softmax-ep2-ddp", "smoe", "softmax", 2),
        _case("mhmoe-xmoe-ep2-ddp", "mhmoe", "xmoe", 2),
        _case("smoe-sigmoid-ep2-fsdp", "smoe", "sigmoid", 2, "fsdp"),
        _case("mhmoe-softmax-ep1-ddp", "mhmoe", "softmax", 1),
        _case("mhmoe-softmax-ep2-recompute", "mhmoe", "softmax", 2, recompute=True),
        _case("one-rank", "smoe", "sigmoid", 2, one_rank=True),  # every token to rank 0's experts
        _case("empty-ranks", "mhmoe", "softmax", 2, empty_ranks=True),  # rank 1 has no tokens
    ]
    results = launch(layer_job, 2, tmp_path, 120, cases)
    _check_layers(results, 2)
    _check_edge_cases(results, 2, 2, empty_heads=2)


def test_layers_four_processes_and_balance_across_layouts(tmp_path):
    layouts = [_case(f"smoe-softmax-ep{p}-ddp", "smoe", "softmax", p) for p in (1, 2, 4)]
    cases = layouts + [
        _case("mhmoe-sigmoid-ep2-fsdp", "mhmoe", "sigmoid", 2, "fsdp"),
        _case("mhmoe-softmax-ep4-ddp", "mhmoe", "softmax", 4),
        _case("one-rank", "smoe", "sigmoid", 4, one_rank=True),
        _case("empty-ranks", "smoe", "softmax", 4, empty_ranks=True),
    ]
    results = launch(layer_job, 4, tmp_path, 150, cases)
    _check_layers(results, 4)
    _check_edge_cases(results, 4, 4, empty_heads=1)
    # the global balance loss is one number, whatever the layout (expert-parallel size 1, 2, 4)
    aux = [results[0][c["name"]]["aux_loss"] for c in layouts]
    assert max(aux) - min(aux) <= 1e-7, aux


def test_expert_parallel_over_the_family_layers(tmp_path):
    """LatentMoE (experts at the latent width) and Multi-Head LatentMoE (a router and a pool per head: the inner layer's
    H·E experts split over the ranks) under expert parallelism equal one process, global balance included."""
    cases = [
        _case("latent-softmax-ep2", "latent", "softmax", 2),
        _case("mh-latent-xmoe-ep2", "mh-latent", "xmoe", 2),
        _case("mh-latent-sigmoid-ep2-fsdp", "mh-latent", "sigmoid", 2, "fsdp"),
    ]
    _check_layers(launch(layer_job, 2, tmp_path, 120, cases), 2)


@pytest.fixture
def corpus(tmp_path) -> Path:
    text = gzip.open(pack_sample("english", "valid.txt.gz"), "rt", encoding="utf-8").read()[:120_000]
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(12):
        (folder / f"doc{i:02d}.txt").write_text(text[i * 10_000 : (i + 1) * 10_000])
    return folder


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def test_training_and_resharding_checkpoints(corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MHMOE_CACHE", str(cache))
    ep2, single = tmp_path / "ep2", tmp_path / "single"
    parallel = ["parallel.expert=2", "parallel.balance=global"]
    launch(train_job, 2, tmp_path, 180, str(corpus), str(cache), str(ep2), ["train.batch_size=2", *parallel])
    train(tiny_config(corpus, "train.batch_size=4"), single, progress=False)  # one process, the same global batch
    curve = max(abs(a - b) for a, b in zip(_losses(ep2), _losses(single)))
    print(f"\n10 steps, 2 processes (EP 2, DDP) vs 1: max |loss difference| {curve:.2e}")
    assert len(_losses(ep2)) == 10 and curve <= FP32

    # resume from step 5 at 4 processes, EP 4, FSDP2: the checkpoint (model + optimiser) is resharded
    cut = tmp_path / "cut"
    shutil.copytree(ep2, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000010")
    (cut / "checkpoints" / "latest").write_text("step-00000005\n")
    # ... with DCP's own pickled metadata replaced by code to run and the manifest re-hashed (anyone can): never read
    marker = tmp_path / "pwned"
    plant_pickle(cut / "checkpoints" / "step-00000005", "dcp/.metadata", marker)
    resume = ["train.batch_size=1", "parallel.expert=4", "parallel.balance=global", "parallel.data=fsdp"]
    launch(train_job, 4, tmp_path, 180, str(corpus), str(cache), str(cut), resume)
    resumed = max(abs(a - b) for a, b in zip(_losses(cut), _losses(ep2)))
    print(f"resumed at EP 4 + FSDP2 from the EP 2 checkpoint of step 5: max |loss difference| {resumed:.2e}")
    assert len(_losses(cut)) == 10 and resumed <= FP32
    assert not marker.exists(), "dcp/.metadata was unpickled"

    # the step-10 checkpoint (EP 2) loaded at EP 1 and EP 4, and the consolidated file without torch.distributed
    step10 = latest_checkpoint(ep2 / "checkpoints")
    assert verify(step10)["format"] == "mhmoe-checkpoint-dcp/2"
    logits = {}
    for world in (1, 4):
        results = launch(load_job, world, tmp_path, 120, str(step10), world)
        assert all(r["step"] == 10 and r["logits_vs_consolidated"] <= 1e-6 for r in results), results
        logits[world] = torch.load(Path(results[0]["logits_dir"]) / "logits.pt")
    plain = GPT(RunConfig.from_dict(json.loads((ep2 / "config.json").read_text())).model)
    load_model_weights(step10, plain)  # what `mhmoe eval` does: one process, safetensors
    x = torch.randint(0, plain.cfg.vocab_size, (3, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = plain.eval()(x).logits
    reshard = max(float((logits[w] - expected).abs().max()) for w in logits)
    print(
        f"EP 2 checkpoint loaded at EP 1 and EP 4 vs the consolidated safetensors: max |logit difference| {reshard:.2e}"
    )
    assert reshard <= 1e-6


class _Exploit:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


def plant_pickle(checkpoint: Path, name: str, marker: Path) -> None:
    """Replace a checkpoint file by a pickle that runs code, and re-hash the manifest so that it verifies."""
    with open(checkpoint / name, "wb") as f:
        pickle.dump(_Exploit(marker), f)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    data = (checkpoint / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def test_distributed_checkpoints_unpickle_nothing(tmp_path):
    """Besides .metadata (above), DCP stores non-tensor values (the optimiser's lr, betas) as pickles and loads them
    with weights_only=False; ours loads them with weights_only=True, and the JSON metadata must name shard files."""
    import io

    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    from mhmoe.errors import CheckpointError
    from mhmoe.train.dcp import SafePlanner, metadata_from_json

    marker = tmp_path / "pwned"
    value = io.BytesIO()
    torch.save({"lr": _Exploit(marker)}, value)
    value.seek(0)
    index = MetadataIndex("optimizer.param_groups.0.lr")
    item = ReadItem(LoadItemType.BYTE_IO, index, torch.Size([]), index, torch.Size([]), torch.Size([]))
    with pytest.raises(CheckpointError, match="optimizer.param_groups.0.lr of a distributed checkpoint is refused"):
        SafePlanner().load_bytes(item, value)
    assert not marker.exists()
    metadata = {"version": "1.0.0", "entries": {"x": "bytes"}, "planner": {}, "modules": [],
                "storage": [["x", None, None, "../../../etc/passwd", 0, 10, []]]}  # fmt: skip
    with pytest.raises(
        CheckpointError, match=r"metadata.json is malformed \(piece of x stored in '../../../etc/passwd'"
    ):
        metadata_from_json(metadata, tmp_path)


def test_masked_multimodal_training_on_two_processes_equals_one(tmp_path, monkeypatch):
    """The masked task gets what the loop gives every task: 2 ranks (experts over both, global balance) train
    as one process on the same global batch, and resume from a distributed checkpoint exactly."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MHMOE_CACHE", str(cache))
    text = gzip.open(pack_sample("english", "valid.txt.gz"), "rt", encoding="utf-8").read()[:60_000]
    corpus = tmp_path / "text"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text(text[i * 10_000 : (i + 1) * 10_000])
    data, ep2, single = str(pack_sample()), tmp_path / "ep2", tmp_path / "single"
    parallel = ["parallel.expert=2", "parallel.balance=global"]
    launch(
        masked_train_job, 2, tmp_path, 240, data, str(corpus), str(cache), str(ep2), ["train.batch_size=2", *parallel]
    )
    train_masked(masked_config(data, str(corpus), "train.batch_size=4"), single, progress=False)
    curve = max(abs(a - b) for a, b in zip(_losses(ep2), _losses(single), strict=True))
    print(f"\nmasked multimodal, 4 steps, 2 processes (EP 2) vs 1: max |loss difference| {curve:.2e}")
    assert len(_losses(ep2)) == 4 and curve <= FP32

    cut = tmp_path / "cut"  # stopped after its step-2 checkpoint; resumed on 2 processes
    shutil.copytree(ep2, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000004")
    (cut / "checkpoints" / "latest").write_text("step-00000002\n")
    launch(
        masked_train_job, 2, tmp_path, 240, data, str(corpus), str(cache), str(cut), ["train.batch_size=2", *parallel]
    )
    assert _losses(cut) == _losses(ep2)


def test_dead_rank_mid_save_keeps_last_checkpoint(tmp_path):
    results = launch(crash_during_save_job, 2, tmp_path, 60, str(tmp_path / "run"), pg_timeout_s=10)
    assert results[0]["error"], "rank 0 should have failed when rank 1 died"
    checkpoints = tmp_path / "run" / "checkpoints"
    last = latest_checkpoint(checkpoints)
    assert last is not None and last.name == "step-00000001"
    assert json.loads((last / "state.json").read_text())["note"] == "complete"
    verify(last)
    assert not (checkpoints / "step-00000002").exists()


@pytest.mark.parametrize("parallel", ["expert", "head"])
def test_dead_rank_ends_the_job(tmp_path, parallel):
    died = launch(dying_job, 2, tmp_path, 60, parallel, pg_timeout_s=10)
    assert died[0]["error"] and died[0]["seconds"] < 10, died[0]  # the survivor errors by itself


def test_hung_rank_ends_the_job(tmp_path):
    with pytest.raises(AssertionError, match="Timed out"):  # a peer that never joins: the collective times out
        launch(hanging_job, 2, tmp_path, 60, pg_timeout_s=3)


def test_expert_parallel_without_torchrun_is_a_clear_error(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("MHMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node 2"):
        train(tiny_config(corpus, "parallel.expert=2"), tmp_path / "run", progress=False)


# ------------------------------------------------------------------------ head parallelism (Multi-Head LatentMoE)

HEAD_MODEL = ["model.ffn.moe.per_head_experts=true", "model.ffn.moe.latent_dim=32"]  # 2 heads, 8 experts each
SHORT = ["train.max_steps=4", "train.checkpoint_every=2"]  # checkpoints at 2 and 4


def _weights_file(run_dir: Path, step: int) -> bytes:
    return (run_dir / "checkpoints" / f"step-{step:08d}" / "model.safetensors").read_bytes()


def test_head_parallel_training_equals_one_process_and_repeats(corpus, tmp_path, monkeypatch):
    """`mhmoe train` with parallel.head=2 on 2 processes: the losses of 4 steps equal one process on the same global
    batch, and a rerun gives the same losses and the same weights, bit for bit."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MHMOE_CACHE", str(cache))
    hp2, rerun, single = tmp_path / "hp2", tmp_path / "rerun", tmp_path / "single"
    options = ["train.batch_size=2", *HEAD_MODEL, *SHORT, "parallel.head=2", "parallel.balance=global"]
    first = launch(train_job, 2, tmp_path, 180, str(corpus), str(cache), str(hp2), options)
    train(tiny_config(corpus, "train.batch_size=4", *HEAD_MODEL, *SHORT), single, progress=False)
    curve = max(abs(a - b) for a, b in zip(_losses(hp2), _losses(single), strict=True))
    print(f"\n4 steps, 2 processes (HP 2) vs 1: max |loss difference| {curve:.2e}")
    assert len(_losses(hp2)) == 4 and curve <= FP32
    again = launch(train_job, 2, tmp_path, 180, str(corpus), str(cache), str(rerun), options)
    assert _losses(rerun) == _losses(hp2) and again[0]["val_loss"] == first[0]["val_loss"]
    assert _weights_file(rerun, 4) == _weights_file(hp2, 4)
    # the experts were held half by each rank (two chunks of 8 in the checkpoint), the routers by both
    entries = json.loads((hp2 / "checkpoints" / "step-00000004" / "dcp" / "metadata.json").read_text())["entries"]
    assert [c[0][0] for c in entries["model.blocks.1.ffn.moe.experts.w_in"]["chunks"]] == [0, 8]
    assert len(entries["model.blocks.1.ffn.moe.router.heads.1.weight"]["chunks"]) == 1


def _cut(run_dir: Path, to: Path, step: int) -> Path:
    """A copy of a run stopped after its checkpoint of `step` (the later ones gone)."""
    shutil.copytree(run_dir, to)
    for later in (to / "checkpoints").glob("step-*"):
        if int(later.name.split("-")[1]) > step:
            shutil.rmtree(later)
    (to / "checkpoints" / "latest").write_text(f"step-{step:08d}\n")
    return to


@pytest.mark.slow  # 25 s on 2 cores: six launches
def test_head_parallel_checkpoints_reshard(corpus, tmp_path, monkeypatch):
    """Distributed checkpoints move between head-parallel layouts and one process: a one-process run (torchrun with
    one rank: the same DCP checkpoints) resumed at HP 2 from its step 2, an HP 2 run resumed on one process and at
    HP 2 × EP 2 with FSDP2 on 4 processes from its step 2, each equal to the run it was cut from; a checkpoint one process wrote
    loaded at HP 2 gives the logits of its consolidated weights."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MHMOE_CACHE", str(cache))
    one, hp2 = tmp_path / "one", tmp_path / "hp2"
    options = [*HEAD_MODEL, *SHORT, "parallel.balance=global"]
    on_two = ["train.batch_size=2", "parallel.head=2", *options]
    on_one = ["train.batch_size=4", *options]
    launch(train_job, 1, tmp_path, 180, str(corpus), str(cache), str(one), on_one)
    launch(train_job, 2, tmp_path, 180, str(corpus), str(cache), str(hp2), on_two)
    to_hp2, to_one = _cut(one, tmp_path / "one-to-hp2", 2), _cut(hp2, tmp_path / "hp2-to-one", 2)
    launch(train_job, 2, tmp_path, 180, str(corpus), str(cache), str(to_hp2), on_two)
    launch(train_job, 1, tmp_path, 180, str(corpus), str(cache), str(to_one), on_one)
    # and on 4 processes, heads over 2 ranks and each head's experts over 2 (expert parallelism composed), FSDP2
    to_both = _cut(hp2, tmp_path / "hp2-to-hp2-ep2", 2)
    on_four = ["train.batch_size=1", "parallel.head=2", "parallel.expert=2", "parallel.data=fsdp", *options]
    launch(train_job, 4, tmp_path, 180, str(corpus), str(cache), str(to_both), on_four)
    for resumed, original in ((to_hp2, one), (to_one, hp2), (hp2, one), (to_both, hp2)):
        gap = max(abs(a - b) for a, b in zip(_losses(resumed), _losses(original), strict=True))
        print(f"\n{resumed.name} vs {original.name}: max |loss difference| {gap:.2e}")
        assert gap <= FP32, (resumed.name, gap)
    step4 = latest_checkpoint(to_one / "checkpoints")  # written by one process; loaded with the heads on 2 ranks
    results = launch(load_job, 2, tmp_path, 120, str(step4), 1, 2)
    assert all(r["step"] == 4 and r["logits_vs_consolidated"] <= 1e-6 for r in results), results
