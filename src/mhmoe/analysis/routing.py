"""Routing analyses of the papers (docs/paper-notes.md §6): expert activation, effective experts, head usage,
sub-token divergence.

Shape legend: T tokens, H heads (1 for SparseMoE), S = T·H sub-tokens (token-major: sub-token j of
token i is row i·H + j), K top-k, E experts, R = S·K routed assignments.

Definitions (the paper gives none precisely, so they are fixed here; each is tested on hand-made routings whose
answer is known):
- share of expert e: its fraction of the layer's R routed assignments (all K choices; sums to 1).
- selection ratio of e: the fraction of the S (sub-)tokens that have e among their top-k
  ("selection frequency / number of tokens", §6); sums to K because a row's K experts are distinct.
- activation ratio: the fraction of (layer, expert) cells whose selection ratio strictly exceeds a
  threshold (default DEFAULT_ACTIVATION_THRESHOLD). Not comparable across expert counts (notes §7).
- relative activation ratio: the same with a threshold of a stated fraction of the uniform ratio (K/E per
  sub-token, 1 − (1 − K/E)^H per token), so it does not saturate or vanish as E changes.
- effective experts: exp(entropy of the shares), between 1 and E; threshold-free. As a fraction of E
  (`effective_fraction`) it measures evenness and is comparable across expert counts (unlike the activation
  ratio). Pooled over the H sub-token streams, or per head (a head's own shares): heads that each keep to a few
  experts look even when pooled, so read the per-head value for MH-MoE.
- divergence of a token: distinct experts reached by its H sub-tokens over all K choices, 1..min(E, H·K), or
  over first choices, 1..H; read it against its chance value under independent heads (`chance_divergence`).

Everything is computed on the CPU in numpy; routing is gathered from `MoEStats` by `LayerRouting.from_stats`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mhmoe.layers.moe import MoEStats

# An expert counts as activated in a layer when MORE than 1% of that layer's (sub-)tokens select it.
# The paper gives no threshold (notes §6); 1% is low enough that any expert doing real work passes and high
# enough that stray, near-zero routing does not. The uniform selection ratio is K/E, so a fixed
# threshold means something different at E = 8 (uniform 12.5%·K) than at E = 256 (0.4%·K): the
# activation ratio is not comparable across expert counts (notes §7); report `effective_fraction` beside it.
DEFAULT_ACTIVATION_THRESHOLD = 0.01


@dataclass
class LayerRouting:
    """One MoE layer's routing over an evaluation set.

    top_experts: (S, K) int, S = T·H sub-tokens token-major, each row K distinct experts in 0..E-1.
    num_heads: H (1 for SparseMoE). num_experts: E. name: a label for plots and summaries.
    With a pool per head (`per_head_experts`) expert e of a row is expert e of that row's head's own pool: the
    per-head metrics are each pool's; pooled over heads, "expert e" is the e-th expert of every pool.
    """

    top_experts: np.ndarray  # (T·H, K) int
    num_heads: int
    num_experts: int
    name: str = ""

    def __post_init__(self) -> None:
        self.top_experts = np.asarray(self.top_experts)
        _check_routing(self.top_experts, self.num_heads, self.num_experts, self.name)

    @property
    def num_tokens(self) -> int:
        return self.top_experts.shape[0] // self.num_heads

    @property
    def top_k(self) -> int:
        return self.top_experts.shape[1]

    @classmethod
    def from_stats(
        cls,
        stats_list: Sequence[MoEStats],
        num_heads: int,
        num_experts: int,
        name: str = "",
        token_masks: Sequence[Tensor | None] | None = None,
    ) -> LayerRouting:
        """Concatenate the `top_experts` (S_i, K) of several forward calls of one layer into numpy.

        token_masks: optional, one per call, (...) bool over that call's T_i = S_i / H tokens, False for
        padding. `top_experts` includes padding rows; a masked token's H rows are dropped whole, so the
        token-major layout survives. Tensors may live on any device.
        """
        if len(stats_list) == 0:
            raise ValueError(f"from_stats needs at least one MoEStats for layer {name!r}, got none")
        if token_masks is not None and len(token_masks) != len(stats_list):
            raise ValueError(f"got {len(token_masks)} token_masks for {len(stats_list)} stats of layer {name!r}")
        _check_positive_int(num_heads=num_heads, num_experts=num_experts)
        masks = token_masks if token_masks is not None else [None] * len(stats_list)
        chunks = [_routed_rows(s.top_experts, m, num_heads, name, i) for i, (s, m) in enumerate(zip(stats_list, masks))]
        if len({c.shape[1] for c in chunks}) > 1:
            raise ValueError(f"layer {name!r}: stats disagree on top_k: {[c.shape[1] for c in chunks]}")
        return cls(np.concatenate(chunks), num_heads, num_experts, name)


def _check_positive_int(**values: int) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


def _check_routing(top_experts: np.ndarray, num_heads: int, num_experts: int, name: str) -> None:
    _check_positive_int(num_heads=num_heads, num_experts=num_experts)
    where = f"layer {name!r}: top_experts"
    if not np.issubdtype(top_experts.dtype, np.integer):
        raise TypeError(f"{where} must hold integers, got dtype {top_experts.dtype}")
    if top_experts.ndim != 2 or top_experts.shape[0] == 0 or top_experts.shape[1] == 0:
        raise ValueError(f"{where} must have shape (T·H, K) with T·H, K >= 1, got {top_experts.shape}")
    rows, k = top_experts.shape
    if rows % num_heads:
        raise ValueError(f"{where} has {rows} rows, not divisible by num_heads ({num_heads})")
    if k > num_experts:
        raise ValueError(f"{where} has top_k {k} > num_experts ({num_experts})")
    low, high = int(top_experts.min()), int(top_experts.max())
    if low < 0 or high >= num_experts:
        raise ValueError(f"{where} values must be in 0..{num_experts - 1}, got range {low}..{high}")
    if k > 1 and (np.diff(np.sort(top_experts, axis=1), axis=1) == 0).any():
        raise ValueError(f"{where}: each row must name {k} distinct experts; some row repeats one")


def _routed_rows(top_experts_SK: Tensor, token_mask: Tensor | None, num_heads: int, name: str, i: int) -> np.ndarray:
    """(S_i, K) tensor -> (S_i', K) int64 numpy, padding tokens' H rows removed."""
    if top_experts_SK.dim() != 2 or top_experts_SK.shape[0] % num_heads:
        raise ValueError(
            f"layer {name!r}, stats {i}: top_experts shape {tuple(top_experts_SK.shape)} must be (T·H, K) "
            f"with rows divisible by num_heads ({num_heads})"
        )
    rows = top_experts_SK.detach().to("cpu", torch.int64).numpy()
    if token_mask is None:
        return rows
    keep_T = token_mask.detach().to("cpu").reshape(-1).numpy()
    if keep_T.dtype != np.bool_ or keep_T.shape[0] * num_heads != rows.shape[0]:
        raise ValueError(
            f"layer {name!r}, stats {i}: token_mask must be bool with {rows.shape[0] // num_heads} tokens "
            f"(rows / num_heads), got dtype {keep_T.dtype} and {keep_T.shape[0]} tokens"
        )
    return rows[np.repeat(keep_T, num_heads)]


def _counts(top_experts: np.ndarray, num_experts: int) -> np.ndarray:
    """(E,) assignments per expert over every entry of `top_experts`."""
    return np.bincount(top_experts.reshape(-1), minlength=num_experts)


def expert_shares(layer: LayerRouting, first_choice_only: bool = False) -> np.ndarray:
    """(E,) fraction of the layer's routed assignments per expert; sums to 1.

    All K choices count by default (R = S·K assignments); first_choice_only counts column 0 only,
    the choice the balance loss sees (notes §2.9).
    """
    chosen = layer.top_experts[:, :1] if first_choice_only else layer.top_experts
    counts = _counts(chosen, layer.num_experts)
    return counts / counts.sum()


def selection_ratio(layer: LayerRouting) -> np.ndarray:
    """(E,) fraction of the S (sub-)tokens that have each expert among their top-k; sums to K.

    notes §6 "selection frequency / number of tokens"; in MH-MoE the tokens are sub-tokens.
    """
    return _counts(layer.top_experts, layer.num_experts) / layer.top_experts.shape[0]


def activation_ratio(layers: Sequence[LayerRouting], threshold: float = DEFAULT_ACTIVATION_THRESHOLD) -> float:
    """Share of (layer, expert) cells whose selection ratio strictly exceeds `threshold`.

    With the default 0.01 an expert is activated in a layer when more than 1% of that layer's
    (sub-)tokens select it (see DEFAULT_ACTIVATION_THRESHOLD). The uniform ratio K/E moves with E,
    so compare this only between models with the same E and K; report effective experts beside it (notes §7).
    """
    if not np.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold}")
    ratios = _per_layer(layers, selection_ratio)
    return float(np.mean(np.concatenate(ratios) > threshold))


def effective_experts(layer: LayerRouting) -> float:
    """exp(entropy of expert_shares), in [1, E]: E for uniform routing, 1 when one expert takes all."""
    shares = expert_shares(layer)
    used = shares[shares > 0]  # 0·log 0 = 0
    return float(np.exp(-(used * np.log(used)).sum()))


def effective_fraction(layer: LayerRouting) -> float:
    """effective_experts / E, in [1/E, 1]. Normalised by E but not free of it: the same tokens spread over more
    experts give noisier shares and a lower fraction, so compare it between models with the same E and read it
    across expert counts with care (it does not saturate as the activation ratio does)."""
    return effective_experts(layer) / layer.num_experts


def _effective(shares: np.ndarray) -> np.ndarray:
    """exp(entropy) of each row of (..., E) shares."""
    logs = np.log(np.where(shares > 0, shares, 1.0))
    return np.exp(-(shares * logs).sum(axis=-1))


def effective_experts_per_head(layer: LayerRouting) -> np.ndarray:
    """(H,) exp(entropy) of each head's own expert shares (`head_usage`), in [1, E].

    The pooled `effective_experts` mixes the H sub-token streams: four heads that each use two of eight
    experts look like eight used evenly when pooled, and like two per head here.
    """
    return _effective(head_usage(layer))


def head_usage(layer: LayerRouting) -> np.ndarray:
    """(H, E): row j is the share of head j's assignments (sub-tokens i·H + j, all K choices) per expert."""
    H, E = layer.num_heads, layer.num_experts
    by_head = layer.top_experts.reshape(layer.num_tokens, H, layer.top_k).transpose(1, 0, 2)  # (H, T, K)
    counts = np.stack([_counts(by_head[j], E) for j in range(H)])  # (H, E)
    return counts / counts.sum(axis=1, keepdims=True)


def subtoken_divergence(layer: LayerRouting, first_choice_only: bool = False) -> np.ndarray:
    """(T,) int: distinct experts reached by each token's H sub-tokens, over all K choices (1..min(E, H·K)) or
    over their first choices only (1..min(E, H)).

    Over all K choices it saturates at min(E, H·K) and chance alone comes close (`chance_divergence`); the
    first-choice form ranges over 1..H. For SparseMoE (H = 1) it is K, or 1.
    """
    chosen = layer.top_experts[:, :1] if first_choice_only else layer.top_experts
    per_token = np.sort(chosen.reshape(layer.num_tokens, -1), axis=1)  # (T, H·K) or (T, H)
    return 1 + (np.diff(per_token, axis=1) != 0).sum(axis=1)


def head_selection(layer: LayerRouting, first_choice_only: bool = False) -> np.ndarray:
    """(H, E): the fraction of head h's sub-tokens that have expert e among their top-k (or as first choice)."""
    H, E = layer.num_heads, layer.num_experts
    chosen = layer.top_experts[:, :1] if first_choice_only else layer.top_experts
    by_head = chosen.reshape(layer.num_tokens, H, -1)  # (T, H, K')
    counts = np.stack([_counts(by_head[:, h], E) for h in range(H)])
    return counts / layer.num_tokens


def chance_divergence(layer: LayerRouting, first_choice_only: bool = False) -> float:
    """The mean `subtoken_divergence` if each head routed its sub-tokens independently of the token's other
    sub-tokens, each at its own measured rates: Σ_e [1 − Π_h (1 − π_he)], π_he = `head_selection`.

    The baseline the observed divergence must beat before it says that a token's sub-tokens are sent apart on
    purpose: for E = 8, H = 4, K = 2 and uniform routing it is 8 · (1 − 0.75⁴) ≈ 5.47 of at most 8.
    """
    missed = np.prod(1 - head_selection(layer, first_choice_only), axis=0)  # (E,) no sub-token reaches e
    return float((1 - missed).sum())


def token_selection_ratio(layer: LayerRouting) -> np.ndarray:
    """(E,) fraction of tokens with at least one sub-token routed to each expert: the paper's per-token
    denominator ("selection frequency / number of tokens"), beside the per-sub-token `selection_ratio`."""
    per_token = layer.top_experts.reshape(layer.num_tokens, -1)  # (T, H·K)
    reached = np.zeros((layer.num_tokens, layer.num_experts), dtype=bool)
    np.put_along_axis(reached, per_token, True, axis=1)
    return reached.mean(axis=0)


def uniform_ratio(layer: LayerRouting, per: str = "subtoken") -> float:
    """Each expert's selection ratio under uniform routing: K/E per sub-token, 1 − (1 − K/E)^H per token."""
    share = layer.top_k / layer.num_experts
    return share if per == "subtoken" else 1 - (1 - share) ** layer.num_heads


def relative_activation_ratio(layers: Sequence[LayerRouting], fraction: float = 0.25, per: str = "subtoken") -> float:
    """Share of (layer, expert) cells whose selection ratio exceeds `fraction` of its uniform value
    (`uniform_ratio`): a threshold that moves with E, K and H, unlike `activation_ratio`'s fixed 1%.

    per: "subtoken" (the ratio over the layer's routed items) or "token" (the paper's per-token denominator).
    """
    if per not in ("subtoken", "token"):
        raise ValueError(f"per must be 'subtoken' or 'token', got {per!r}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    ratio = selection_ratio if per == "subtoken" else token_selection_ratio
    active = [ratio(layer) > fraction * uniform_ratio(layer, per) for layer in layers]
    if not active:
        raise ValueError("need at least one LayerRouting, got none")
    return float(np.mean(np.concatenate(active)))


def relative_activation_ratio_per_head(layers: Sequence[LayerRouting], fraction: float = 0.25) -> float:
    """Share of (layer, head, expert) cells whose per-head selection ratio (`head_selection`: the fraction of
    head h's sub-tokens with e among their top-k) exceeds `fraction` of the uniform K/E: the relative activation
    of each sub-token stream, as `effective_experts_per_head` is the per-head form of the pooled count. Pooled,
    four heads that each use a quarter of the experts look fully active; per head they are 25% active. Equals
    the per-sub-token `relative_activation_ratio` for H = 1."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not layers:
        raise ValueError("need at least one LayerRouting, got none")
    active = [(head_selection(layer) > fraction * uniform_ratio(layer)).reshape(-1) for layer in layers]
    return float(np.mean(np.concatenate(active)))


def mean_divergence(layers: Sequence[LayerRouting]) -> np.ndarray:
    """(T,) float: subtoken_divergence averaged over layers; every layer must cover the same T tokens."""
    divergences = _per_layer(layers, subtoken_divergence)
    lengths = {d.shape[0] for d in divergences}
    if len(lengths) > 1:
        names = [(layer.name, layer.num_tokens) for layer in layers]
        raise ValueError(f"layers cover different numbers of tokens (name, T): {names}")
    return np.mean(np.stack(divergences), axis=0)


RELATIVE_FRACTION = 0.25  # an expert is active when its selection ratio exceeds a quarter of the uniform ratio


def summarize(layers: Sequence[LayerRouting], threshold: float = DEFAULT_ACTIVATION_THRESHOLD) -> dict:
    """JSON-ready summary over layers (means over layers; per-head values also over heads):

    activation_ratio (fixed `threshold`, the paper's form; saturates at small E), activation_relative and
    activation_relative_token (selection ratio above RELATIVE_FRACTION of uniform, per sub-token and per token),
    activation_relative_head (the same per head: each sub-token stream's own selection ratios);
    effective_experts / effective_fraction pooled over the H sub-token streams, and *_head per head;
    divergence_mean over all K choices beside divergence_chance (independent heads at their own measured
    rates), and divergence_top1 beside divergence_top1_chance (first choices, range 1..H); per_layer details.
    """
    ratio = activation_ratio(layers, threshold)  # also rejects an empty list and a bad threshold
    per_layer = [
        dict(
            name=layer.name,
            effective_experts=effective_experts(layer),
            effective_experts_per_head=effective_experts_per_head(layer).tolist(),
            max_share=float(expert_shares(layer).max()),
            min_share=float(expert_shares(layer).min()),
        )
        for layer in layers
    ]
    per_head = np.concatenate([effective_experts_per_head(layer) for layer in layers])
    fractions = np.concatenate([effective_experts_per_head(layer) / layer.num_experts for layer in layers])

    def mean(metric: Callable[[LayerRouting], float]) -> float:
        return float(np.mean([metric(layer) for layer in layers]))

    return dict(
        activation_ratio=ratio,
        threshold=float(threshold),
        activation_relative=relative_activation_ratio(layers, RELATIVE_FRACTION, "subtoken"),
        activation_relative_token=relative_activation_ratio(layers, RELATIVE_FRACTION, "token"),
        activation_relative_head=relative_activation_ratio_per_head(layers, RELATIVE_FRACTION),
        relative_fraction=RELATIVE_FRACTION,
        effective_experts=float(np.mean([row["effective_experts"] for row in per_layer])),
        effective_fraction=mean(effective_fraction),
        effective_experts_head=float(per_head.mean()),
        effective_fraction_head=float(fractions.mean()),
        divergence_mean=float(mean_divergence(layers).mean()),
        divergence_chance=mean(chance_divergence),
        divergence_top1=float(np.mean([subtoken_divergence(layer, True).mean() for layer in layers])),
        divergence_top1_chance=mean(lambda layer: chance_divergence(layer, True)),
        per_layer=per_layer,
    )


def language_expert_information(shares_LE: np.ndarray) -> float:
    """I(language; expert) in bits, languages weighted equally: H(mean of the rows) − mean of the rows' H.

    shares_LE: (languages, E) expert shares of one layer, each row summing to 1 (`expert_shares` per language).
    0 when every language uses the experts alike; at most min(log2 L, log2 E) for L languages and E experts
    (log2 L when no two languages share an expert, which needs E >= L): 3 bits with 8 experts, whatever L.
    """
    shares = np.asarray(shares_LE, dtype=float)
    if shares.ndim != 2 or 0 in shares.shape:
        raise ValueError(f"shares_LE must be a non-empty (languages, experts) array, got shape {shares.shape}")
    if (shares < 0).any() or not np.allclose(shares.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError(f"each row of shares_LE must be >= 0 and sum to 1, got row sums {shares.sum(axis=1)}")

    def entropy(p: np.ndarray) -> np.ndarray:
        return -np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0).sum(axis=-1)

    return float(max(entropy(shares.mean(axis=0)) - entropy(shares).mean(), 0.0))


def _per_layer(layers: Sequence[LayerRouting], metric: Callable[[LayerRouting], np.ndarray]) -> list[np.ndarray]:
    if len(layers) == 0:
        raise ValueError("need at least one LayerRouting, got none")
    return [metric(layer) for layer in layers]
