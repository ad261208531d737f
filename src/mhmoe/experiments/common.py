"""What the reproductions share: the models of the comparison, the models × seeds driver, aggregation over seeds,
paired statistics, curves, and writing results.json / results.md.

The models (NAME in results.json), sized from a base model configuration (its `ffn.moe` gives E, top-k and the
expert hidden F); every one trains on the same batches for the same number of steps per seed.

The paper's models, in two parts: `part="core"` is v2's comparison at equal FLOPs per token, `part="params"` v1's
at equal parameters (its MH-MoE costs about H× the expert FLOPs, so it is a part of its own):
    dense                FFN hidden `ffn.hidden` in every block                                  (core, params)
    smoe                 softmax top-k SMoE, E experts of hidden F, in every `moe_every`-th block (core)
    xmoe                 the same with the X-MoE router                                          (core, params)
    mhmoe_flops          MH-MoE (X-MoE router, H = 4), hidden solved for equal FLOPs per token and E raised for
                         about equal total parameters (v2)                                      (core)
    mhmoe_params         MH-MoE (X-MoE router, H = 4), same E and top-k, hidden solved for equal total parameters
                         (v1)                                                                    (params)
The controls (`part="controls"`): `mhmoe_flops` against `xmoe` changes three things at once (the head split, the
granularity — H·K expert calls of smaller experts instead of K — and X-MoE's routing dimension 16/H); each control
changes one, all at equal FLOPs per token and about equal parameters, all with the softmax router of `smoe`:
    smoe_fine            fine-grained SMoE at MH-MoE's granularity: E·H experts, top-(K·H), hidden for equal FLOPs
    mhmoe_flops_softmax  `mhmoe_flops` with the softmax router (the router of its SMoE baseline)
    mhmoe_h1             MH-MoE with H = 1: head and merge layers only, no split
    mhmoe_nohm           MH-MoE with H = 4 and no head or merge layer: the split alone
The controls part includes `smoe`, their reference in the paired statistics (`paired_table`); `all` is every model
once. Parts run into the same output folder share their common models (finished runs are reused).
`part="family"` sets the multi-head family side by side at equal FLOPs, all with the softmax router (`FAMILY`):
smoe, smoe_fine, latent_moe (LatentMoE), mhmoe_flops_softmax (MH-MoE) and mh_latent_moe (Multi-Head LatentMoE).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

from mhmoe.analysis.compare import metric_curve as metric_curve  # re-exported for the experiments
from mhmoe.analysis.stats import holm, paired_difference
from mhmoe.errors import ConfigError, DataError
from mhmoe.io import atomic_write, write_json, write_text
from mhmoe.layers.config import MoEConfig
from mhmoe.layers.routers import RouterConfig
from mhmoe.models.cost import (
    Cost,
    SizeMatchError,
    fine_grained_smoe,
    flops_matched_latent_moe,
    flops_matched_mhmoe,
    layer_all_to_all_values,
    params_matched_mhmoe,
)
from mhmoe.models.ffn import FFNConfig, FFNKind, LayerSpec

MH_HEADS = 4
Curve = list[tuple[float, float]]  # (x, y) points, x in tokens (or input positions)


@dataclass
class Variant:
    name: str
    matching: str  # "baseline", "params" (v1) or "flops" (v2)
    ffn: FFNConfig


Part = Literal["core", "params", "controls", "heads", "all", "decisive", "v2", "family"]
PARTS: tuple[str, ...] = get_args(Part)
CORE = ("dense", "smoe", "xmoe", "mhmoe_flops")
PARAMS = ("dense", "xmoe", "mhmoe_params")
CONTROLS = ("smoe", "smoe_fine", "mhmoe_flops_softmax")  # granularity, at one router (softmax)
HEADS = ("smoe", "mhmoe_flops_softmax", "mhmoe_h1", "mhmoe_nohm")  # the head split and the head / merge layers
# The decisive MH-MoE is `mhmoe_flops` (X-MoE router), not `mhmoe_flops_softmax`: (1) it is the model of the
# headline the part is to settle (quick runs: mhmoe_flops − dense −7.1% [−11.1, −3.0]); (2) its per-seed spread
# against dense was half the softmax MH-MoE's (sd of the paired difference 0.035 vs 0.077 nats: 5 seeds have 93%
# vs 49% power at the quick runs' effect), and the X-MoE router was made for stable routing; (3) v1 builds every
# MH-MoE on it. The cost, stated with the contrast: MH-MoE − smoe_fine also changes the router (X-MoE against
# softmax), whose own effect given MH-MoE was +1.3% [−7.7, +11.2] on the quick runs (none resolved).
DECISIVE_MHMOE = "mhmoe_flops"
DECISIVE = ("dense", "smoe_fine", DECISIVE_MHMOE)
# v2's Table 1 protocol (PAPER.md; `mhmoe.models.cost.presets` at D = 768): a SwiGLU top-1 SMoE of 8 experts of
# hidden 8/3·D, fine-grained SMoE (16 × half width, top-2), MH-MoE H = 2 (40 × 768 at D = 768, top-2) and H = 3
# (96 × 512, top-3), all with the softmax router at equal FLOPs per token and about equal parameters
V2 = ("v2_smoe", "v2_fine", "v2_mhmoe_h2", "v2_mhmoe_h3")
# The multi-head family (issue 26, docs/family.md) at equal FLOPs per token and about equal parameters, every member
# with the softmax router of `smoe` (one router kind, so that the family's differences are not the router's):
#     smoe, smoe_fine, mhmoe_flops_softmax   as in the controls (MH-MoE: H = 4, one shared router and pool)
#     latent_moe      LatentMoE: experts at width L = D/2, D/L = 2× the experts and top-k (the paper's rule), hidden
#                     solved for equal FLOPs with the down / up projections counted (`flops_matched_latent_moe`)
#     mh_latent_moe   Multi-Head LatentMoE: head layer D → L = D/2, H = 4 sub-tokens of L/4, a router and a pool per
#                     head, hidden and per-head expert count solved as MH-MoE's (`flops_matched_mhmoe`)
# L = D/2 at both budgets: D = 128 (quick) gives sub-tokens of 16, D = 384 (--gpu) of 48; a quarter (NemotronH's
# ratio) would leave the quick sub-tokens 8 wide and LatentMoE 4× the experts, as many as smoe_fine.
FAMILY = ("smoe", "smoe_fine", "latent_moe", "mhmoe_flops_softmax", "mh_latent_moe")
FAMILY_LATENT_FRACTION = 2  # L = D / 2
ALL_TO_ALL_RANKS = 4  # the ranks the results' all-to-all values per token assume (EP and HP alike)


@dataclass(frozen=True)
class Contrast:
    """A paired contrast `model` − `reference` (per seed, same batches), and the question it answers."""

    model: str
    reference: str
    question: str

    @property
    def label(self) -> str:
        return f"{self.model} − {self.reference}"


# Declared before any run (issue 24): the decisive part's two primary contrasts, read at 5% without adjustment;
# every other contrast of a table is exploratory and Holm-adjusted (`holm_adjust`).
PRIMARY = (
    Contrast(DECISIVE_MHMOE, "dense", "does MH-MoE beat a dense model of equal FLOPs per token?"),
    Contrast(
        DECISIVE_MHMOE,
        "smoe_fine",
        "does MH-MoE beat SMoE of its granularity at equal FLOPs and parameters? (changes the head split, the head "
        "and merge layers, the experts' count and width, and the router: X-MoE vs softmax)",
    ),
)


@dataclass(frozen=True)
class PartSpec:
    """A part of a reproduction: the models it trains and the contrasts it declares primary (none: exploratory)."""

    name: str
    models: tuple[str, ...]
    primary: tuple[Contrast, ...] = ()


# The family part's two primary contrasts, declared before its runs (read at 5%, unadjusted; the rest Holm-adjusted)
FAMILY_PRIMARY = (
    Contrast(
        "mh_latent_moe",
        "latent_moe",
        "does splitting LatentMoE's latent token into 4 heads, each with its own router and pool, help at equal FLOPs? "
        "(changes the split, who routes: the sub-token of L/4 against the full token, a pool per head, the head and "
        "merge layers' biases, the experts' count and width)",
    ),
    Contrast(
        "mhmoe_flops_softmax",
        "smoe_fine",
        "does MH-MoE beat SMoE of its granularity at equal FLOPs and parameters, with the same (softmax) router? "
        "(changes the head split, the head and merge layers, the experts' count and width)",
    ),
)

PART_SPECS = {
    "core": PartSpec("core", CORE),
    "params": PartSpec("params", PARAMS),
    "controls": PartSpec("controls", CONTROLS),
    "heads": PartSpec("heads", HEADS),
    "all": PartSpec("all", tuple(dict.fromkeys(CORE + PARAMS + CONTROLS + HEADS))),
    "decisive": PartSpec("decisive", DECISIVE, PRIMARY),
    "v2": PartSpec("v2", V2),
    "family": PartSpec("family", FAMILY, FAMILY_PRIMARY),
}
PART_MODELS = {name: spec.models for name, spec in PART_SPECS.items()}
BASELINES = (
    "smoe",
    "xmoe",
    "smoe_fine",
    "v2_smoe",
    "v2_fine",
)  # the sparse baselines a model is compared with (the best one)
# (model, its control, the question, everything the pair changes besides the sizes that its rows show): every pair
# at equal FLOPs per token and about equal parameters, so the experts' count and width move with what it tests
ATTRIBUTION = (
    ("mhmoe_flops_softmax", "smoe", "MH-MoE against SMoE, both with the softmax router",
     "the split into 4 heads (expert input D/4, 4× the routed sub-tokens), the head and merge layers, the experts' "
     "count and width"),
    ("mhmoe_flops_softmax", "smoe_fine", "what MH-MoE adds to SMoE of fine granularity",
     "the split into 4 heads (expert input D/4 against D: 36 experts D/4 → F → D/4 against 32 of D → F/4 → D), "
     "the head and merge layers, top-2 per sub-token against top-8 per token"),
    ("mhmoe_flops_softmax", "mhmoe_h1", "4 heads against 1, given the head and merge layers",
     "the split (expert input D/4 against D, 4× the expert calls per token) and the experts' count (×4) and width"),
    ("mhmoe_flops_softmax", "mhmoe_nohm", "the head and merge layers, given the split into 4 heads",
     "the head and merge layers' D×D weights, and the experts' count and width re-solved for equal FLOPs and "
     "parameters"),
    ("mhmoe_flops", "mhmoe_flops_softmax", "the X-MoE router against softmax, given MH-MoE",
     "the router only (X-MoE: projection to routing dimension 16/4, cosine scores, learned temperature)"),
    ("mhmoe_flops", "xmoe", "MH-MoE against X-MoE, both with the X-MoE router",
     "the split into 4 heads (expert input D/4), the head and merge layers, the experts' count and width, and "
     "X-MoE's routing (input D/4 against D, routing dimension 16/4 against 16)"),
    ("latent_moe", "smoe", "LatentMoE against SMoE, both routing the full token with the softmax router",
     "the experts' width (L = D/2 against D), 2× the experts and the top-k, the D×L down and L×D up projections "
     "(no biases), the expert hidden re-solved for equal FLOPs"),
    ("mh_latent_moe", "latent_moe", "4 heads with a router and pool each, given the latent width L = D/2",
     "the split of the latent token into 4 sub-tokens (expert input L/4 against L), routing the sub-token (L/4) "
     "instead of the full token (D), 4 pools of their own, head and merge layers with biases against bias-free "
     "projections, the top-k per item (K against 2K), the experts' count and width"),
    ("mh_latent_moe", "mhmoe_flops_softmax", "Multi-Head LatentMoE against MH-MoE, both with 4 heads",
     "the latent width (head and merge layers D×L and L×D with L = D/2 against D×D, sub-tokens L/4 against D/4), "
     "a router and pool per head against one shared by the heads, the experts' count and width"),
)  # fmt: skip


def variants(d_model: int, ffn: FFNConfig, part: Part = "core") -> list[Variant]:
    """The models of the comparison (module doc), from a base model's width and FFN section."""
    moe = ffn.moe

    def ffn_of(kind: FFNKind, config: MoEConfig) -> FFNConfig:
        return FFNConfig(kind=kind, hidden=ffn.hidden, activation=ffn.activation, moe_every=ffn.moe_every, moe=config)

    def flops_matched(base: MoEConfig, heads: int) -> MoEConfig:
        return sized(flops_matched_mhmoe, d_model, base, num_heads=heads, top_k=K, experts_multiple=4)

    K = moe.top_k
    base = dataclasses.replace(moe.routed_part(), num_shared_experts=0, shared_expert_hidden=None)
    smoe = dataclasses.replace(base, router=RouterConfig(kind="softmax"))
    xmoe = dataclasses.replace(base, router=RouterConfig(kind="xmoe"))
    unprojected = dataclasses.replace(smoe, multi_head_layers=0, merge_layers=0)
    models = {
        "dense": Variant("dense", "baseline", ffn_of("dense", smoe)),
        "smoe": Variant("smoe", "baseline", ffn_of("smoe", smoe)),
        "xmoe": Variant("xmoe", "baseline", ffn_of("smoe", xmoe)),
        "mhmoe_params": Variant(
            "mhmoe_params",
            "params",
            ffn_of("mhmoe", sized(params_matched_mhmoe, d_model, xmoe, num_heads=MH_HEADS)),
        ),
        "mhmoe_flops": Variant("mhmoe_flops", "flops", ffn_of("mhmoe", flops_matched(xmoe, MH_HEADS))),
    }
    if part in ("controls", "heads", "all", "decisive", "family"):
        fine = sized(fine_grained_smoe, d_model, smoe, granularity=MH_HEADS)
        models.update(
            smoe_fine=Variant("smoe_fine", "flops", ffn_of("smoe", fine)),
            mhmoe_flops_softmax=Variant("mhmoe_flops_softmax", "flops", ffn_of("mhmoe", flops_matched(smoe, MH_HEADS))),
            mhmoe_h1=Variant("mhmoe_h1", "flops", ffn_of("mhmoe", flops_matched(smoe, 1))),
            mhmoe_nohm=Variant("mhmoe_nohm", "flops", ffn_of("mhmoe", flops_matched(unprojected, MH_HEADS))),
        )
    if part == "v2":
        models.update(v2_variants(d_model, ffn_of))
    if part == "family":
        models.update(family_variants(d_model, smoe, ffn_of))
    return [models[name] for name in PART_MODELS[part]]


def v2_variants(d_model: int, ffn_of: Callable[[FFNKind, MoEConfig], FFNConfig]) -> dict[str, Variant]:
    """v2 Table 1's four models (`V2`) at width `d_model` (divisible by 3, for H = 3), the SwiGLU experts' hidden
    8/3·D rounded to 64 (2048 at D = 768)."""
    if d_model % 3:
        raise ConfigError(
            f"the v2 part needs a model width divisible by 3 for its H = 3 MH-MoE, got model.d_model={d_model}: "
            "use --gpu (D = 384) or the quick v2 budget (D = 192)"
        )
    hidden = max(64, round(8 * d_model / 3 / 64) * 64)
    smoe = MoEConfig(num_experts=8, top_k=1, expert_hidden=hidden, activation="swiglu")
    return {
        "v2_smoe": Variant("v2_smoe", "baseline", ffn_of("smoe", smoe)),
        "v2_fine": Variant("v2_fine", "flops", ffn_of("smoe", sized(fine_grained_smoe, d_model, smoe, granularity=2))),
        "v2_mhmoe_h2": Variant(
            "v2_mhmoe_h2", "flops", ffn_of("mhmoe", sized(flops_matched_mhmoe, d_model, smoe, num_heads=2, top_k=2))
        ),
        "v2_mhmoe_h3": Variant(
            "v2_mhmoe_h3", "flops", ffn_of("mhmoe", sized(flops_matched_mhmoe, d_model, smoe, num_heads=3, top_k=3))
        ),
    }


def family_variants(
    d_model: int, smoe: MoEConfig, ffn_of: Callable[[FFNKind, MoEConfig], FFNConfig]
) -> dict[str, Variant]:
    """The family's latent members (`FAMILY`) at equal FLOPs per token with `smoe` (its router: softmax), at latent
    width L = D / `FAMILY_LATENT_FRACTION` and `MH_HEADS` heads; ConfigError when the width does not divide."""
    latent = d_model // FAMILY_LATENT_FRACTION
    if d_model % FAMILY_LATENT_FRACTION or latent % MH_HEADS:
        raise ConfigError(
            f"the family part needs model.d_model divisible by {FAMILY_LATENT_FRACTION * MH_HEADS} (latent width "
            f"D/{FAMILY_LATENT_FRACTION} split into {MH_HEADS} heads), got {d_model}"
        )
    lat = sized(flops_matched_latent_moe, d_model, smoe, latent_dim=latent, experts_multiple=4)
    mh = sized(flops_matched_mhmoe, d_model, smoe, num_heads=MH_HEADS, top_k=smoe.top_k, experts_multiple=4,
               latent_dim=latent, per_head_experts=True)  # fmt: skip
    return {
        "latent_moe": Variant("latent_moe", "flops", ffn_of("smoe", lat)),
        "mh_latent_moe": Variant("mh_latent_moe", "flops", ffn_of("mhmoe", mh)),
    }


def sized(solver: Callable[..., MoEConfig], d_model: int, base: MoEConfig, **options: Any) -> MoEConfig:
    """The solver's sizes with expert_hidden a multiple of 32, or of 16 or 8 where 32 cannot meet the match within
    its tolerance (toy widths); where the solver also rounds the expert count (`experts_multiple`) and no hidden
    multiple meets the match, any expert count is tried last (H = 1 at equal FLOPs raises 8 experts to 9). The
    last SizeMatchError when none can."""
    attempts = [dict(hidden_multiple=multiple) for multiple in (32, 16, 8)]
    if options.get("experts_multiple", 1) != 1:
        attempts += [dict(hidden_multiple=multiple, experts_multiple=1) for multiple in (32, 16, 8)]
    for attempt in attempts:
        try:
            return solver(d_model, base, **{**options, **attempt})
        except SizeMatchError as error:
            last = error
    raise last


RECORD = "record.json"  # a finished run's per-seed record: a rerun reads it back instead of training again


def seed_config(base: Any, variant: Variant, seed: int) -> Any:
    """The shared budget `base` (any run configuration with model.ffn and train.seed) with the variant's FFN and
    the seed."""
    cfg = copy.deepcopy(base)
    cfg.model.ffn = copy.deepcopy(variant.ffn)
    cfg.train.seed = seed
    return cfg


class Record(Protocol):
    """A typed per-seed record (e.g. `english.LMSeed`): JSON-ready through to_dict."""

    def to_dict(self) -> dict: ...


class JobProgress:
    """The overall line of a job of several runs: "run i of N", the time elapsed, and the time left, estimated as
    the mean wall time of the runs trained so far times the runs still to train (a run already finished in the
    output folder is reused in a moment, so it counts as neither)."""

    def __init__(self, run_dirs: Sequence[Path], clock: Callable[[], float] = time.monotonic) -> None:
        self.total = len(run_dirs)
        self.to_train = {d for d in run_dirs if not (d / RECORD).is_file()}
        self.clock = clock
        self.begun = clock()
        self.index = 0
        self.trained_seconds: list[float] = []
        self._current: tuple[Path, float] | None = None

    def start(self, run_dir: Path) -> str:
        """Close the previous run and open `run_dir`'s; returns the progress text to print before it."""
        self._close()
        self.index += 1
        self._current = (run_dir, self.clock())
        elapsed = self._current[1] - self.begun
        left = len(self.to_train)
        if not left:
            estimate = "nothing left to train"
        elif self.trained_seconds:
            estimate = f"about {clock_time(statistics.mean(self.trained_seconds) * left)} left"
        else:
            estimate = "time left known after the first run"
        return f"run {self.index} of {self.total} ({clock_time(elapsed)} elapsed, {estimate}): "

    def _close(self) -> None:
        if self._current is not None and self._current[0] in self.to_train:
            self.to_train.discard(self._current[0])
            self.trained_seconds.append(self.clock() - self._current[1])


def clock_time(seconds: float) -> str:
    """Seconds as h:mm:ss or m:ss."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


RunSeed = Callable[[Variant, int, Any, Path], "dict | Record"]  # (variant, seed, config, run dir) -> its record
Aggregate = Callable[[Variant, Any, list[dict]], dict]  # (variant, config, seed records) -> results.json entry
Curves = dict[str, dict[str, tuple[Curve, list]]]  # {curve key: {model: (mean curve, min-max band)}}
OnRound = Callable[[dict[str, dict], Curves, int], None]  # (aggregates, curves, seeds finished so far)


def run_variants(
    base: Any,
    models: Sequence[Variant],
    seeds: int,
    out: Path,
    run_seed: RunSeed,
    aggregate: Aggregate,
    on_round: OnRound | None = None,
    keep_checkpoints: bool = True,
) -> tuple[dict[str, dict], Curves]:
    """Train and analyse every model for every seed, seed-major (seed 0 of every model, then seed 1, ...), so
    that a part stopped at any point has whole seed rounds of every model; after each round `on_round` gets the
    aggregates of the seeds so far (to rewrite results.json). Returns ({name: aggregate}, curves). A seed's record
    holds "curves": {key: points} (left out of the aggregate's "seeds"); it is written to the run's record.json,
    and a run that has one is read back, not trained (a rerun into the same `out` continues). After its record
    is written a run's checkpoints are deleted unless `keep_checkpoints`."""
    runs: dict[str, list[dict]] = {variant.name: [] for variant in models}
    results: dict[str, dict] = {}
    curves: Curves = {}
    progress = JobProgress([out / "runs" / f"{v.name}-seed{seed}" for seed in range(seeds) for v in models])
    for seed in range(seeds):
        for variant in models:
            runs[variant.name].append(seed_record(base, variant, seed, out, run_seed, keep_checkpoints, progress))
        results, curves = aggregate_rounds(base, models, runs, aggregate)
        if on_round is not None:
            on_round(results, curves, seed + 1)
    return results, curves


def seed_record(
    base: Any,
    variant: Variant,
    seed: int,
    out: Path,
    run_seed: RunSeed,
    keep_checkpoints: bool = True,
    progress: JobProgress | None = None,
) -> dict:
    """One run's record: read back from its record.json when it finished before, else trained and analysed
    (announced on stdout), written, and its checkpoints deleted unless `keep_checkpoints`. The record is always
    the JSON text's (a reused run and a fresh one give the same results.json)."""
    run_dir = out / "runs" / f"{variant.name}-seed{seed}"
    path = run_dir / RECORD
    cfg = seed_config(base, variant, seed)
    step = progress.start(run_dir) if progress else ""
    if path.is_file():
        check_same_budget(run_dir, cfg)
        print(f"== {step}{variant.name} (seed {seed}) finished before: {path} reused", flush=True)
        return json.loads(path.read_text())
    print(f"== {step}{variant.name} (seed {seed}) -> {run_dir}", flush=True)
    record = run_seed(variant, seed, cfg, run_dir)
    write_json(path, record if isinstance(record, dict) else record.to_dict())
    if not keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return json.loads(path.read_text())


SAME_BUDGET = ("max_steps", "batch_size", "grad_accum", "lr", "warmup_steps", "seed")  # what a reused run must share


def check_same_budget(run_dir: Path, cfg: Any) -> None:
    """DataError unless the finished run in `run_dir` was trained with `cfg`'s model (all but its vocabulary,
    which the data fills in) and training budget (`SAME_BUDGET`): a part must not reuse another budget's run."""
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        return  # a record without its config: nothing to compare (written by hand, or a copied archive)
    stored, wanted = json.loads(config_path.read_text()), json.loads(json.dumps(cfg.to_dict()))
    differ = [
        f"model.{k}" for k in wanted["model"] if k != "vocab_size" and stored["model"].get(k) != wanted["model"][k]
    ]
    differ += [f"train.{k}" for k in SAME_BUDGET if stored["train"].get(k) != wanted["train"][k]]
    if differ:
        raise DataError(
            f"{run_dir} finished with another budget ({', '.join(differ[:3])} differ): a part reuses only runs of "
            "its own budget; pass another --out"
        )


def aggregate_rounds(
    base: Any, models: Sequence[Variant], runs: dict[str, list[dict]], aggregate: Aggregate
) -> tuple[dict[str, dict], Curves]:
    """The aggregates and mean curves of every model over the seeds it has finished."""
    results: dict[str, dict] = {}
    curves: Curves = {}
    for variant in models:
        seed_runs = runs[variant.name]
        results[variant.name] = aggregate(variant, seed_config(base, variant, seed_runs[-1]["seed"]), seed_runs)
        for key in seed_runs[0]["curves"]:
            points = [r["curves"][key] for r in seed_runs]
            if all(points):
                curves.setdefault(key, {})[variant.name] = mean_curve(points)
    return results, curves


class Clock:
    """Wall and CPU seconds of a run's phases, lap by lap: {"train": {"wall": s, "cpu": s}, ...}. CPU time is
    this process's (all threads), so on a busy machine it stays meaningful where wall time does not."""

    def __init__(self) -> None:
        self.laps: dict[str, dict[str, float]] = {}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.laps[name] = {"wall": wall - self._wall, "cpu": cpu - self._cpu}
        self._wall, self._cpu = wall, cpu


# ------------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class PlannedModel:
    """One model of a reproduction's plan, per seed: its size, forward FLOPs per token and the tokens it reads."""

    name: str
    params_total: int
    flops_per_token: int  # forward; training counts 3× (forward and backward)
    steps: int
    train_tokens: int
    eval_tokens: int  # forward only: periodic and final evaluations and the routing analysis


def planned_model(name: str, cost: Cost, train: Any, per_batch: int, extra_eval_tokens: int) -> PlannedModel:
    """A model of a plan from its cost and the training budget `train` (a TrainConfig): `per_batch` tokens per
    micro-batch, every periodic and final evaluation (a whole split counted as `eval_batches`) plus
    `extra_eval_tokens` (the routing analyses)."""
    evaluations = train.max_steps // train.eval_every * train.eval_batches
    evaluations += 2 * (train.final_eval_batches or train.eval_batches)  # validation and test
    return PlannedModel(
        name=name,
        params_total=cost.params_total,
        flops_per_token=cost.flops_per_token,
        steps=train.max_steps,
        train_tokens=train.max_steps * train.grad_accum * per_batch,
        eval_tokens=evaluations * per_batch + extra_eval_tokens,
    )


def finished_seeds(out: Path, name: str, seeds: int) -> int:
    """How many of a model's seeds already finished in `out` (their runs are reused, not trained again)."""
    runs = [out / "runs" / f"{name}-seed{seed}" for seed in range(seeds)]
    return sum((run / RECORD).is_file() or (run / "summary.json").is_file() for run in runs)


# ------------------------------------------------------------------------------------------------ aggregation


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation; no spread (None) from one value."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def model_fields(variant: Variant, cost: Cost, d_model: int | None = None) -> dict:
    """What a model is: its matching, size and cost; given the model's width `d_model`, also its place in the
    family (`family_fields`)."""
    ffn = variant.ffn
    moe = ffn.kind != "dense"
    fields = {
        "matching": variant.matching,
        "params_total": cost.params_total,
        "params_active": cost.params_active,
        "flops_per_token": cost.flops_per_token,
        "num_experts": ffn.moe.num_experts if moe else 0,
        "expert_hidden": ffn.moe.expert_hidden if moe else ffn.hidden,
    }
    return {**fields, **family_fields(variant, d_model)} if moe and d_model else fields


def family_fields(variant: Variant, d_model: int) -> dict:
    """A sparse model's place in the family: top-k, latent width (None: the model's), heads, pools, router kind,
    the experts' input width, and the values one token sends through one MoE layer's forward all-to-alls over
    `ALL_TO_ALL_RANKS` ranks under expert parallelism and, for per-head pools only, head parallelism (None)."""
    moe, kind = variant.ffn.moe, variant.ffn.kind
    heads = moe.num_heads if kind == "mhmoe" else 1
    per_head = kind == "mhmoe" and moe.per_head_experts
    spec = LayerSpec(kind, d_model, moe)
    return {
        "top_k": moe.top_k,
        "latent_dim": moe.latent_dim,
        "num_heads": heads,
        "pools": heads if per_head else 1,
        "router": moe.router.kind,
        "expert_width": (moe.latent_dim or d_model) // heads,
        "all_to_all_ranks": ALL_TO_ALL_RANKS,
        "all_to_all_values_ep": layer_all_to_all_values(spec, "expert", ALL_TO_ALL_RANKS),
        "all_to_all_values_hp": layer_all_to_all_values(spec, "head", ALL_TO_ALL_RANKS),
    }


def seed_stats(runs: Sequence[dict], keys: Sequence[str]) -> dict:
    """key and key_std: mean and standard deviation over the seeds that have the key (None when none has it)."""
    out: dict[str, float | None] = {}
    for key in keys:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key], out[f"{key}_std"] = mean_std(values) if values else (None, None)
    return out


def mean_of(runs: Sequence[dict], which: str, key: str) -> float | None:
    """Mean over seeds of runs[i][which][key], for the seeds that have a `which` report."""
    values = [r[which][key] for r in runs if r.get(which)]
    return statistics.fmean(values) if values else None


def run_fields(runs: Sequence[dict]) -> dict:
    """Tokens per model, mean training time, and the seeds' records (without their curves)."""
    return {
        "tokens_seen": runs[0]["tokens_seen"],
        "train_seconds": statistics.fmean(r["train_seconds"] for r in runs),
        "seeds": [{k: v for k, v in r.items() if k != "curves"} for r in runs],
    }


def per_seed(models: dict[str, dict], name: str, key: str) -> dict[int, float]:
    """{seed: value of `key`} of a model's seeds that have it."""
    return {r["seed"]: r[key] for r in models[name]["seeds"] if r.get(key) is not None}


def contrast(models: dict[str, dict], key: str, model: str, reference: str) -> dict | None:
    """The paired difference model − reference of `key` over the seeds both ran (a PairedDifference dict), or
    None when either did not run or they share no seed."""
    if model not in models or reference not in models:
        return None
    a, b = per_seed(models, model, key), per_seed(models, reference, key)
    seeds = sorted(set(a) & set(b))
    return paired_difference([a[s] for s in seeds], [b[s] for s in seeds]).to_dict() if seeds else None


def paired_table(models: dict[str, dict], key: str, baselines: Sequence[str] = BASELINES) -> dict[str, dict]:
    """Per model, the paired per-seed difference of `key` (a log-scale value such as a mean loss, one per seed in
    each model's "seeds") to `dense` and to the best sparse baseline (lowest mean among `baselines` present):
    {model: {"vs_dense": PairedDifference dict, "vs_baseline": ..., "baseline": name}}. Seeds pair by number."""
    present = [b for b in baselines if b in models and per_seed(models, b, key)]
    best = min(present, key=lambda b: statistics.fmean(per_seed(models, b, key).values())) if present else None
    table: dict[str, dict] = {}
    for name in models:
        row: dict[str, Any] = {"baseline": best}
        for label, other in (("vs_dense", "dense"), ("vs_baseline", best)):
            if other is None or other == name:
                continue
            difference = contrast(models, key, name, other)
            if difference is not None:
                row[label] = difference
        table[name] = row
    return table


def attribution_table(models: dict[str, dict], key: str) -> list[dict]:
    """The pairs of `ATTRIBUTION` whose two models both ran: [{"model", "control", "isolates", "changes" (every
    difference of the pair, its experts × hidden first), "difference": PairedDifference dict of `key` (model −
    control, per seed)}]."""
    rows = []
    for model, control, isolates, changes in ATTRIBUTION:
        difference = contrast(models, key, model, control)
        if difference is not None:
            sized = all("num_experts" in models[name] for name in (model, control))
            sizes = f"{experts_cell(models[model])} against {experts_cell(models[control])}; " if sized else ""
            rows.append({"model": model, "control": control, "isolates": isolates, "difference": difference,
                         "changes": sizes + changes})  # fmt: skip
    return rows


def primary_table(models: dict[str, dict], key: str, primary: Sequence[Contrast]) -> list[dict]:
    """The pre-declared primary contrasts that ran: [{"model", "reference", "question", "difference"}]; read at
    5% each, without adjustment (they were declared before the runs, `PRIMARY`)."""
    rows = []
    for c in primary:
        difference = contrast(models, key, c.model, c.reference)
        if difference is not None:
            rows.append({"model": c.model, "reference": c.reference, "question": c.question, "difference": difference})
    return rows


def holm_adjust(paired: dict[str, dict], attribution: list[dict], primary: Sequence[Contrast] = ()) -> int:
    """Holm-adjust the p-values of every exploratory contrast of a key's tables as one family (a pair that two
    tables show counts once; the `primary` pairs are left out): each gets "p_holm". Returns the family's size."""
    family: dict[tuple[str, str], list[dict]] = {}
    declared = {(c.model, c.reference) for c in primary}
    for name, row in paired.items():
        for label, other in (("vs_dense", "dense"), ("vs_baseline", row.get("baseline"))):
            if label in row and (name, other) not in declared:
                family.setdefault((name, str(other)), []).append(row[label])
    for row in attribution:
        if (row["model"], row["control"]) not in declared:
            family.setdefault((row["model"], row["control"]), []).append(row["difference"])
    pairs = [pair for pair, ds in family.items() if ds[0].get("p") is not None]
    for pair, adjusted in zip(pairs, holm([family[pair][0]["p"] for pair in pairs]), strict=True):
        for d in family[pair]:
            d["p_holm"] = adjusted
    return len(pairs)


def contrast_tables(
    models: dict[str, dict],
    keys: Sequence[str],
    baselines: Sequence[str] = BASELINES,
    attribution: bool = True,
    primary: Sequence[Contrast] = (),
) -> dict[str, dict]:
    """Every statistic of a results.json, per key: {"primary": {key: rows}, "paired": {key: table},
    "attribution": {key: rows} (when `attribution`), "holm_family": {key: its size}}, exploratory ones
    Holm-adjusted."""
    tables: dict[str, dict] = {"primary": {}, "paired": {}, "holm_family": {}}
    if attribution:
        tables["attribution"] = {}
    for key in keys:
        paired = paired_table(models, key, baselines)
        rows = attribution_table(models, key) if attribution else []
        tables["primary"][key] = primary_table(models, key, primary)
        tables["paired"][key] = paired
        if attribution:
            tables["attribution"][key] = rows
        tables["holm_family"][key] = holm_adjust(paired, rows, primary)
    return tables


POWER_NOTE = (
    "Mean change of perplexity over the seeds both models ran, [95% t-interval]; signs k/n = seeds whose "
    "difference has the mean's sign, with the exact two-sided binomial p of that count (5/5 alone is p = 0.062); "
    "resolved = the interval excludes 0, and for an exploratory contrast also its Holm-adjusted p < 0.05 (Holm over "
    "every exploratory contrast of the tables; the primary contrasts, declared before the runs, are not adjusted); "
    "seeds for 3% = the seeds a paired t-test needs to detect a true 3% difference with 80% power at the spread "
    "these seeds show (a 50%-power figure, the seeds whose interval would just exclude 0, is smaller)."
)


def primary_markdown(rows: list[dict], what: str) -> str:
    """The primary contrasts as markdown (empty when none ran)."""
    if not rows:
        return ""
    lines = [f"| primary contrast | question | {what} change | seeds for 3% (80% power) |", "|---|---|---:|---:|"]
    for row in rows:
        d = row["difference"]
        lines.append(
            f"| {row['model']} − {row['reference']} | {row['question']} | {_paired_cell(d)} | {_seeds_80(d)} |"
        )
    return "\n".join(lines)


def attribution_markdown(rows: list[dict], what: str) -> str:
    """The attribution pairs as markdown (empty when no pair ran: run `--part all`, or the parts into one --out)."""
    if not rows:
        return ""
    lines = [f"| model − control | question | what the pair changes | {what} change | seeds for 3% (80% power) |",
             "|---|---|---|---:|---:|"]  # fmt: skip
    for row in rows:
        d, changes = row["difference"], row.get("changes", "-")
        lines.append(f"| {row['model']} − {row['control']} | {row['isolates']} | {changes} | {_paired_cell(d)} "
                     f"| {_seeds_80(d)} |")  # fmt: skip
    return "\n".join(lines)


def _seeds_80(d: dict | None) -> str:
    return "-" if not d or d.get("seeds_80") is None else str(d["seeds_80"])


def _paired_cell(d: dict | None) -> str:
    """mean [interval]; signs k/n (binomial p); Holm p where adjusted; resolved where it holds (POWER_NOTE)."""
    if not d:
        return "-"
    text = f"{d['mean_pct']:+.1f}%"
    if d["low_pct"] is not None:
        text += f" [{d['low_pct']:+.1f}, {d['high_pct']:+.1f}]"
    if d.get("sign_p") is not None:
        text += f"; signs {d['sign_holds']}/{d['seeds']} (p = {d['sign_p']:.3g})"
    else:  # a results.json of an older mhmoe: `--tables-only` recomputes it
        text += f" ({d['sign_holds']}/{d['seeds']})"
    adjusted = d.get("p_holm")
    if adjusted is not None:
        text += f"; Holm p = {adjusted:.2g}"
    if d["resolved"] and (adjusted is None or adjusted < 0.05):
        return text + " **resolved**"
    return text + (" (resolved before Holm only)" if d["resolved"] else "")


def paired_markdown(paired: dict[str, dict], what: str) -> str:
    """The paired table: per model, the mean change of perplexity against dense and the best baseline (the cells
    of POWER_NOTE), and the seeds a 3% difference needs at 80% power at the spread these seeds show."""
    baseline = next((row["baseline"] for row in paired.values() if row.get("baseline")), None)
    versus = baseline or "best sparse baseline"
    lines = [
        f"| model | {what} vs dense | {what} vs {versus} | seeds for 3% at 80% power (vs dense, vs {versus}) |",
        "|---|---:|---:|---:|",
    ]
    for name, row in paired.items():
        dense, base = row.get("vs_dense"), row.get("vs_baseline")
        lines.append(
            f"| {name} | {_paired_cell(dense)} | {_paired_cell(base)} | {_seeds_80(dense)}, {_seeds_80(base)} |"
        )
    return "\n".join(lines)


def mean_curve(curves: Sequence[Curve]) -> tuple[Curve, list[tuple[float, float, float]]]:
    """The mean of several curves (at the points all have) and its min–max band."""
    points = min(len(c) for c in curves)
    mean, band = [], []
    for i in range(points):
        xs, ys = curves[0][i][0], [c[i][1] for c in curves]
        mean.append((xs, statistics.fmean(ys)))
        band.append((xs, min(ys), max(ys)))
    return mean, band


# ------------------------------------------------------------------------------------------------ output


def copy_figure(source: Path, target: Path) -> None:
    """A figure a run wrote, copied into the results folder (if the run made it)."""
    if source.exists():
        with atomic_write(target, "wb") as f:
            f.write(source.read_bytes())


def write_results(out: Path, results: dict, table: Callable[[dict], str]) -> None:
    """results.json and results.md (the table) in `out`."""
    write_json(out / "results.json", results)
    write_text(out / "results.md", table(results) + "\n")


def retabulate(
    out: Path,
    table: Callable[[dict], str],
    keys: Sequence[str],
    baselines: Sequence[str] = BASELINES,
    attribution: bool = True,
) -> dict:
    """The statistics and tables of a finished reproduction recomputed from its results.json (the per-seed values
    it holds), by this version of mhmoe: results.json and results.md rewritten, nothing trained or evaluated. The
    primary contrasts are those of the part it records."""
    path = out / "results.json"
    if not path.is_file():
        raise DataError(f"{out} holds no results.json: run the reproduction into it first, or pass the --out that does")
    try:
        results = json.loads(path.read_text())
        models = results["models"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DataError(
            f"{path} is not a reproduction's results ({error}): restore it or run the reproduction again"
        ) from None
    spec = PART_SPECS.get(results.get("part") or "")
    primary = spec.primary if spec else ()
    results.update(contrast_tables(models, keys, baselines, attribution, primary))
    write_results(out, results, table)
    return results


def fmt(mean: float | None, std: float | None, seeds: int, digits: int = 2) -> str:
    """ "mean ± std" (std only with several seeds), "-" for a missing value."""
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if seeds > 1 and std is not None else f"{mean:.{digits}f}"


def experts_cell(model: dict) -> str:
    """ "E × F", "P·E × F" for P pools of E (a pool per head), "dense F"."""
    if not model["num_experts"]:
        return f"dense {model['expert_hidden']}"
    pools = model.get("pools") or 1
    return f"{f'{pools}·' if pools > 1 else ''}{model['num_experts']} × {model['expert_hidden']}"


def pct_cell(value: float | None) -> str:
    """A fraction as a whole percentage, "-" when missing."""
    return "-" if value is None else f"{100 * value:.0f}%"


def num_cell(value: float | None) -> str:
    """A number with two decimals, "-" when missing."""
    return "-" if value is None else f"{value:.2f}"


def effective_cell(value: float | None, fraction: float | None) -> str:
    return "-" if value is None or fraction is None else f"{value:.2f} ({100 * fraction:.0f}%)"


def split_bands(curves: dict[str, tuple[Curve, list]]) -> tuple[dict[str, Curve], dict[str, list]]:
    """{name: (mean, band)} -> ({name: mean}, {name: band}), as `plot_curves` takes them."""
    return {k: v[0] for k, v in curves.items()}, {k: v[1] for k, v in curves.items()}
