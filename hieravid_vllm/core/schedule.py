"""Budget schedule: per-stage retention, exact kept counts, per-segment counts.

Layer-level balancing (Sec. 3.3, Eq. 11)
----------------------------------------
The LLM is split into n stages (first layers ``HieraVidConfig.stage_boundaries``: 0, 7, 14, 21
for 28 layers). Stage 1 sees the tokens left by static-token merging,
|H_v^1| = |H_v^0| (1 - R_merge); stage i >= 2 sees |H_v^i| = |H_v^0| (1 - R_merge)
prod_{k=2..i} (1 - R_prune^k) (Eq. 11; we index R_prune^k by the stage it produces).

The paper gives neither R_merge nor the R_prune^k, only the relative budget b and that more
tokens are kept early and fewer late. We use the simplest family with that property, a
**geometric decay with a constant per-stage prune ratio** (PyramidDrop, which the paper cites
for its multi-stage design, uses a constant per-stage ratio too):

    rho_i = min(1, c * q^(i-1)),   sum_i w_i rho_i = b,   w_i = layers in stage i / layers,

with q = ``stage_decay`` (default 0.65, i.e. R_prune^i = 0.35 in every pruning stage) and c
solved exactly (the capped stages form a prefix, so c has a closed form per prefix length).
So R_merge = 1 - rho_1 and R_prune^i = 1 - rho_i / rho_{i-1}. Budget 1.0 gives rho = 1
everywhere (nothing merged or pruned); q = 1 gives uniform retention b in every layer.

Why q = 0.65: with Eq. 12 (``core.flops``) it reproduces the paper's FLOPs column at b = 0.3,
24.4% vs 24.5% (LLaVA-Video-7B, Table 1) and 26.4% vs 26.3% (LLaVA-OneVision-7B, Table 2),
where uniform 30% gives 23.9% / 26.0%. Retention per stage at q = 0.65:

    b = 0.3: 0.511, 0.332, 0.216, 0.140
    b = 0.2: 0.341, 0.222, 0.144, 0.094
    b = 0.1: 0.170, 0.111, 0.072, 0.047

The paper's 0.2 / 0.1 FLOPs (17.2% / 8.5% on LLaVA-Video) cannot be reached by any schedule
whose layer-averaged share is b without keeping almost nothing after stage 1; we keep the
budget definition (layer-averaged share = b) and report the gap (benchmarks/flops.py).

Exact integer counts (vLLM must know them before seeing content)
----------------------------------------------------------------
For N visual tokens: K = round(R_merge * N) (round half up), capped by the number of tokens
that can be merged at all ((T-1) H' W', ``max_merge``); n_1 = N - K;
n_i = min(n_{i-1}, max(1, round(rho_i * N))) for i >= 2 (at least one visual token per stage
when N >= 1). Each n_i is within 1 token of rho_i * N (K capped aside), so the layer-averaged
share equals b within 1 / N. ``input_only`` mode (Table 4 ablation): every layer sees
round(b * N); merging uses the same R_merge (clamped so that N - K >= round(b * N)) and one
DPP selection before the LLM brings it down to round(b * N).

Segment budget allocation (Sec. 3.1.2, Eq. 4-5): :func:`segment_counts`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .config import DEFAULT_NUM_LAYERS, HieraVidConfig

__all__ = [
    "StageSchedule",
    "stage_retention",
    "build_schedule",
    "round_half_up",
    "segment_scores",
    "allocate_segment_counts",
    "segment_counts",
    "segment_counts_on_device",
]


def round_half_up(x: float) -> int:
    """Deterministic rounding used for every count: floor(x + 0.5)."""
    return int(math.floor(x + 0.5))


def _solve_capped_geometric(target: float, weights: Sequence[float], shape: Sequence[float],
                            cap: float) -> List[float]:
    """rho_i = min(cap, c * shape_i) with sum_i w_i rho_i = target (shape non-increasing)."""
    total_w = sum(weights)
    if target >= cap * total_w - 1e-15:
        return [cap] * len(weights)
    if target <= 0:
        return [0.0] * len(weights)
    # the capped stages are a prefix j = 0..n-1; find the consistent one
    for j in range(len(weights)):
        rest = sum(w * s for w, s in zip(weights[j:], shape[j:]))
        c = (target - cap * sum(weights[:j])) / rest
        ok_uncapped = c * shape[j] <= cap + 1e-15
        ok_capped = j == 0 or c * shape[j - 1] >= cap - 1e-15
        if ok_uncapped and ok_capped:
            return [cap] * j + [min(cap, c * s) for s in shape[j:]]
    raise AssertionError("unreachable: target < cap * sum(weights)")  # pragma: no cover


def stage_retention(budget: float, layers_per_stage: Sequence[int], decay: float = 0.65,
                    merge_ratio: Optional[float] = None) -> List[float]:
    """Continuous per-stage retention rho_i (share of the original N) for Eq. 11.

    ``rho_i = min(1, c q^(i-1))`` with the layer-weighted mean equal to ``budget``. With an
    explicit ``merge_ratio`` rho_1 = 1 - R_merge is fixed and stages 2..n follow
    ``min(rho_1, c q^(i-2))`` with the remaining share; raises ValueError when no such
    schedule exists (merge keeps fewer than the budget, or more than the budget allows).
    """
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    total = float(sum(layers_per_stage))
    w = [lp / total for lp in layers_per_stage]
    n = len(w)
    if merge_ratio is None:
        return _solve_capped_geometric(budget, w, [decay ** i for i in range(n)], 1.0)
    rho1 = 1.0 - merge_ratio
    if n == 1:
        if abs(rho1 - budget) > 1e-12:
            raise ValueError(
                f"merge_ratio={merge_ratio} with a single stage must equal 1 - budget "
                f"({1 - budget:g})")
        return [rho1]
    rest = budget - w[0] * rho1
    if rho1 < budget - 1e-12:
        raise ValueError(
            f"merge_ratio={merge_ratio} keeps {rho1:g} of the tokens, less than the budget "
            f"{budget:g}; merge_ratio must be <= 1 - budget")
    if rest <= 0:
        raise ValueError(
            f"merge_ratio={merge_ratio} leaves too many tokens: stage 1 alone exceeds the "
            f"budget {budget:g}; merge_ratio must be > {1 - budget / w[0]:g}")
    later = _solve_capped_geometric(rest, w[1:], [decay ** i for i in range(n - 1)], rho1)
    return [rho1] + later


@dataclass(frozen=True)
class StageSchedule:
    """Exact per-stage visual-token counts for one video.

    ``counts[i]`` is the number of visual tokens seen by every layer of stage i (layers
    ``boundaries[i] .. boundaries[i+1]-1``); ``counts[0] = num_visual - merge_count``.
    ``uses_dpp[i]`` says whether the pruning that produces stage i runs the DPP (False for
    stage 0, the merge, and for relevance-only stages).
    """

    num_visual: int
    num_layers: int
    mode: str
    boundaries: Tuple[int, ...]
    layers_per_stage: Tuple[int, ...]
    retention: Tuple[float, ...]
    counts: Tuple[int, ...]
    merge_count: int
    uses_dpp: Tuple[bool, ...]
    input_target: int  # visual tokens entering the LLM (counts[0])

    @property
    def merge_ratio(self) -> float:
        return self.merge_count / self.num_visual if self.num_visual else 0.0

    @property
    def prune_ratios(self) -> Tuple[float, ...]:
        """R_prune^i = 1 - counts[i] / counts[i-1] for stages 2..n (Eq. 11)."""
        return tuple(1.0 - (b / a if a else 1.0) for a, b in zip(self.counts, self.counts[1:]))

    def tokens_per_layer(self) -> List[int]:
        """Visual tokens at the input of each of the ``num_layers`` layers."""
        out: List[int] = []
        for c, lp in zip(self.counts, self.layers_per_stage):
            out.extend([c] * lp)
        return out

    def layer_mean_share(self) -> float:
        """Layer-averaged share of visual tokens (equals the budget within 1 / N)."""
        if not self.num_visual:
            return 0.0
        return sum(self.tokens_per_layer()) / (self.num_layers * self.num_visual)


def build_schedule(config: HieraVidConfig, num_visual: int,
                   num_layers: int = DEFAULT_NUM_LAYERS,
                   max_merge: Optional[int] = None) -> StageSchedule:
    """Exact integer schedule for ``num_visual`` tokens (Eq. 11; module docstring).

    ``max_merge``: how many tokens can be merged at all ((T-1) * H' * W' for a video of T
    frames); K is capped by it (a single frame has nothing to merge). Counts depend only on
    (config, num_visual, num_layers, max_merge), never on content.
    """
    if num_visual < 0:
        raise ValueError(f"num_visual must be >= 0, got {num_visual}")
    bounds = config.stage_boundaries(num_layers)
    lps = config.layers_per_stage(num_layers)
    rho = stage_retention(config.budget, lps, config.stage_decay, config.merge_ratio)
    N = num_visual
    r_merge = 1.0 - rho[0]
    K = round_half_up(r_merge * N)
    if max_merge is not None:
        K = min(K, max(0, int(max_merge)))
    K = max(0, min(K, N))
    n_stages = len(lps)
    uses_dpp = tuple(i > 0 and (i + 1) >= config.dpp_from_stage for i in range(n_stages))
    if config.mode == "input_only":
        target = min(N, max(1 if N else 0, round_half_up(config.budget * N)))
        K = min(K, N - target)
        counts = tuple([target] * n_stages)
        return StageSchedule(N, num_layers, config.mode, tuple(bounds), tuple(lps),
                             tuple([config.budget] * n_stages), counts, K,
                             tuple([False] * n_stages), target)
    counts = [N - K]
    for r in rho[1:]:
        c = max(1 if N else 0, round_half_up(r * N))
        counts.append(min(counts[-1], c))
    return StageSchedule(N, num_layers, config.mode, tuple(bounds), tuple(lps), tuple(rho),
                         tuple(counts), K, uses_dpp, counts[0])


# ------------------------------------------------------------------------------------------
# Segment budget allocation (Sec. 3.1.2)
# ------------------------------------------------------------------------------------------
def _cos(a: np.ndarray, b: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise cosine (float64 numpy), 0 when either vector is zero."""
    num = np.einsum("ij,ij->i", a, b)
    den = np.sqrt(np.einsum("ij,ij->i", a, a)) * np.sqrt(np.einsum("ij,ij->i", b, b))
    return np.where(den > eps, num / np.maximum(den, eps), 0.0)


def _segment_scores_host(g: np.ndarray, lam: float, missing_neighbor: str) -> np.ndarray:
    """:func:`segment_scores` on a float64 numpy (M, C) array: M-sized host work, where a
    numpy op costs a tenth of a torch op's dispatch."""
    M = g.shape[0]
    if missing_neighbor not in ("neutral", "zero"):
        raise ValueError(f"missing_neighbor must be 'neutral' or 'zero', got {missing_neighbor!r}")
    if M <= 1:
        return np.full(M, 0.5)
    csum = np.cumsum(g, axis=0)
    g_l = csum - g                      # sum of segments 0..m-1
    g_r = csum[-1:] - csum              # sum of segments m+1..M-1
    s_l = _cos(g, g_l)
    s_r = _cos(g, g_r)
    if missing_neighbor == "neutral":
        s_l[0] = s_l[1:].mean()
        s_r[-1] = s_r[:-1].mean()
    return lam * s_r + (1.0 - lam) * (1.0 - s_l)


def segment_scores(g: torch.Tensor, lam: float = 0.5,
                   missing_neighbor: str = "neutral") -> torch.Tensor:
    """Eq. 4: b_m = lambda s(g_m, g_r) + (1 - lambda)(1 - s(g_m, g_l)), float64, shape (M,).

    ``g`` (M, C): mean-pooled features of the segments in temporal order; g_l / g_r are the
    SUMS of the segment features left / right of m (as printed). Edge cases the paper skips:
    segment 1 has no left and segment M no right neighbours. ``missing_neighbor="neutral"``
    (default): the missing term takes the mean of the same term over the segments that have
    it, so position alone does not move a segment's budget (with M = 2 both scores are equal,
    hence no deviation); ``"zero"``: the empty sum is the zero vector and its cosine is 0
    (first segment maximally diverse, last segment minimally representative). M = 1: [0.5].
    Computed on the host in float64 numpy; returned on ``g``'s device.
    """
    b = _segment_scores_host(g.detach().to("cpu", torch.float64).numpy(), lam,
                             missing_neighbor)
    return torch.from_numpy(b).to(g.device)


def _shift_estimate(lf_h: np.ndarray, kr_h: np.ndarray, target: int) -> Optional[float]:
    """tau with sum_m lf_m clip(kr_m + tau, 0, 1) = target, from the piecewise-linear form
    (breakpoints -kr_m and 1 - kr_m, interpolated on the piece that crosses ``target``); None
    where no piece crosses with a positive slope. A few ulps off in general: a hint only."""
    P = np.sort(np.concatenate((-kr_h, 1.0 - kr_h)))
    F = (lf_h * np.clip(kr_h + P[:, None], 0.0, 1.0)).sum(axis=1)
    i = int(np.searchsorted(F, target, side="right")) - 1
    if i < 0 or i + 1 >= P.shape[0] or not (F[i + 1] > F[i] and P[i + 1] > P[i]):
        return None
    return float(P[i] + (target - F[i]) * (P[i + 1] - P[i]) / (F[i + 1] - F[i]))


def _reconcile_shift(lf_h: np.ndarray, kr_h: np.ndarray, target: int) -> float:
    """The largest double tau (bisection) with sum_m lf_m clip(kr_m + tau, 0, 1) <= target,
    for 0 < target < sum lf. Runs on the host in numpy (M values): one device read instead of
    a host sync per step on CUDA, and a tenth of torch's per-op cost on CPU. numpy reduces in
    an order fixed by the length alone (one thread), so every device and process gets the
    same shift.

    The bisection takes the same steps as evaluating the sum at every midpoint, but evaluates
    it only near the crossing: the computed sum is nondecreasing in tau (every rounding step
    of it is monotone and its order is fixed), so a midpoint at or below a point known to
    satisfy ``<= target`` satisfies it too, and one at or above a point known to fail fails.
    Two such points are taken close around :func:`_shift_estimate` (about 8 evaluations
    instead of about 60; the shift is bit for bit the one of evaluating every step)."""
    buf = np.empty_like(kr_h)

    def _sum(tau: float) -> float:   # preallocated, no numpy wrappers: ~1 us per call
        np.add(kr_h, tau, out=buf)
        np.clip(buf, 0.0, 1.0, out=buf)
        np.multiply(lf_h, buf, out=buf)
        return float(np.add.reduce(buf))

    lo = -1.0 - float(kr_h.max())   # every segment at 0: sum 0 <= target
    hi = 1.0 - float(kr_h.min())    # every segment full: sum total > target
    below, above = lo, hi           # known: sum(below) <= target < sum(above)
    est = _shift_estimate(lf_h, kr_h, target)
    if est is not None:
        # bracket the crossing around the estimate (typically a few ulps off): 16 ulps each
        # side, widened 256-fold while the crossing is outside
        d = 16.0 * float(np.spacing(max(abs(est), 2.0 ** -20)))
        for _ in range(4):
            for p in (est - d, est + d):
                if below < p < above:
                    if _sum(p) <= target:
                        below = p
                    else:
                        above = p
            if above - below <= 2.0 * d:
                break
            d *= 256.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if mid == lo or mid == hi:
            # lo and hi are adjacent doubles: every later step would leave them unchanged
            # (_sum(lo) <= target < _sum(hi) is kept), so stopping here gives the same lo
            break
        if mid <= below or (mid < above and _sum(mid) <= target):
            lo = mid
        else:
            hi = mid
    return lo


def _allocate_counts_host(lengths: np.ndarray, keep_ratio: np.ndarray,
                          target: int) -> np.ndarray:
    """:func:`allocate_segment_counts` on numpy arrays (int64 lengths, float64 keep ratios)."""
    M = lengths.shape[0]
    total = int(lengths.sum())
    if not 0 <= target <= total:
        raise ValueError(f"target {target} outside [0, {total}] (tokens available)")
    if M == 0 or target == 0:
        return np.zeros(M, dtype=np.int64)
    if target == total:
        return lengths.copy()
    lf = lengths.astype(np.float64)
    lo = _reconcile_shift(lf, keep_ratio, target)
    y = lf * np.clip(keep_ratio + lo, 0.0, 1.0)
    base = np.minimum(np.floor(y).astype(np.int64), lengths)
    r = target - int(base.sum())
    frac = y - base
    eligible = base < lengths
    # largest remainder among eligible; ties by index (stable sort of -frac)
    order = np.argsort(np.where(eligible, -frac, np.inf), kind="stable")
    give = min(max(r, 0), int(eligible.sum()))
    counts = base.copy()
    counts[order[:give]] += 1
    left = target - int(counts.sum())
    if left > 0:  # only reachable through float round-off: fill spare capacity in index order
        cap = lengths - counts
        before = np.cumsum(cap) - cap
        counts = counts + np.minimum(np.clip(left - before, 0, None), cap)
    elif left < 0:  # pragma: no cover - lo keeps sum(y) <= target
        raise AssertionError("allocation overshoot")
    return counts


def allocate_segment_counts(lengths: torch.Tensor, keep_ratio: torch.Tensor,
                            target: int) -> torch.Tensor:
    """Integer counts x_m in [0, len_m] with sum x_m = target, close to keep_ratio_m * len_m.

    Reconciliation (deterministic): a common shift tau of the keep ratios is found by
    bisection so that sum_m len_m * clip(keep_m + tau, 0, 1) = target (the shift keeps Eq. 5's
    form base + R_var z), then largest remainder: floors, and the missing units go to the
    segments with the largest fractional part (ties: lower segment index), never above len_m.
    M-sized: runs on the host in numpy; returned on ``lengths``' device.
    """
    counts = _allocate_counts_host(lengths.to("cpu", torch.int64).numpy(),
                                   keep_ratio.detach().to("cpu", torch.float64).numpy(),
                                   int(target))
    return torch.from_numpy(counts).to(lengths.device)


def segment_sums(features: torch.Tensor, seg: torch.Tensor, M: int,
                 matmul: Optional[bool] = None) -> torch.Tensor:
    """(M, C) float32 sums of the rows of ``features`` (n, C) per segment id ``seg`` (n,).

    Deterministic on every device, so that tensor-parallel ranks, which run the selection on
    the same replicated hidden states, compute bit-identical sums (and so the same counts):
    CUDA's ``index_add_`` adds with atomics in a run-dependent order, so there (``matmul``
    None on CUDA) the sums are a one-hot (M, n) x (n, C) product instead; CPU keeps
    ``index_add_`` (sequential over the index, deterministic).
    """
    x = features.to(torch.float32)
    idx = seg.to(x.device)
    if matmul if matmul is not None else x.is_cuda:
        onehot = idx.unsqueeze(0) == torch.arange(M, device=x.device).unsqueeze(1)
        return onehot.to(torch.float32) @ x
    return torch.zeros(M, x.shape[-1], dtype=torch.float32, device=x.device).index_add_(0, idx, x)


def host_segment_lengths(segment_ids: torch.Tensor,
                         num_segments: Optional[int] = None) -> torch.Tensor:
    """Tokens per segment (M,) int64 on the host, from one read of ``segment_ids`` (ids
    0..M-1; M = ``num_segments`` or max id + 1)."""
    seg_h = segment_ids.to("cpu", torch.int64)
    n = seg_h.shape[0]
    M = int(num_segments) if num_segments is not None else (int(seg_h.max()) + 1 if n else 0)
    return torch.bincount(seg_h, minlength=M)[:M] if n else torch.zeros(M, dtype=torch.int64)


def segment_counts(features: torch.Tensor, segment_ids: torch.Tensor, target: int,
                   config: HieraVidConfig, num_segments: Optional[int] = None,
                   lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-segment kept counts for one pruning stage (Eq. 4-5), summing exactly to ``target``.

    ``features`` (n, C) are the tokens entering the stage, ``segment_ids`` (n,) their segment
    (ids in temporal order, 0..M-1). g_m = mean of segment m's tokens; b_m by Eq. 4; Eq. 5
    gives R^{i,m} = R^i + R_var (b_m - mean b) / std b (population std; std = 0 or a single
    non-empty segment: no deviation). Sign: Eq. 5 literally makes a higher b_m prune MORE,
    but the text says segments with richer / more diverse content retain more, and the
    authors' code computes keep = base + R_var * z; we follow the text and the code by default
    (keep_m = base_keep + R_var z_m) and ``segment_score_keeps_more=False`` gives the literal
    Eq. 5. base_keep = target / n. Reconciled by :func:`allocate_segment_counts`.

    Everything of size M runs on the host: the segment sums (the only (n, C) work) are
    computed where ``features`` live and read back once, then Eq. 4-5 and the allocation run
    on CPU tensors (on CUDA: two device reads instead of a dozen syncs and ~100 tiny
    launches). ``lengths``: the per-segment token counts when the caller already has them on
    the host (else one read of ``segment_ids``). Returns int64 (M,) on the host when
    ``lengths`` is given, else on ``segment_ids``' device; empty segments get 0.
    """
    seg = segment_ids.to(torch.int64)
    n = seg.shape[0]
    out_dev = torch.device("cpu") if lengths is not None else seg.device
    lengths = (host_segment_lengths(seg, num_segments) if lengths is None
               else lengths.to("cpu", torch.int64))
    M = lengths.shape[0]
    sums = None
    if counts_need_sums(lengths.numpy(), config):
        sums = segment_sums(features, seg, M).cpu().numpy()
    return torch.from_numpy(segment_counts_from_sums(sums, lengths.numpy(), n, int(target),
                                                     config)).to(out_dev)


def counts_need_sums(lengths_h: np.ndarray, config: HieraVidConfig) -> bool:
    """Whether :func:`segment_counts` reads the segment sums (Eq. 4): more than one
    non-empty segment and a positive ``r_var``."""
    return int((lengths_h > 0).sum()) > 1 and config.r_var > 0


def segment_counts_from_sums(sums_h: Optional[np.ndarray], lengths_h: np.ndarray, n: int,
                             target: int, config: HieraVidConfig) -> np.ndarray:
    """The host part of :func:`segment_counts` (Eq. 4-5 and the allocation) on the (M, C)
    float32 segment sums read back from the device (``sums_h``; None when
    :func:`counts_need_sums` is False) and the int64 lengths: int64 (M,) counts."""
    M = lengths_h.shape[0]
    if n == 0 or M == 0:
        if target != 0:
            raise ValueError(f"target {target} with no tokens")
        return np.zeros(M, dtype=np.int64)
    base_keep = target / n
    nonempty = lengths_h > 0
    z = np.zeros(M)
    if sums_h is not None:
        g = sums_h / np.maximum(lengths_h, 1).astype(np.float32)[:, None]   # float32, as summed
        b = _segment_scores_host(g[nonempty].astype(np.float64), config.lam,
                                 config.missing_neighbor)
        std = b.std()                                                  # population std
        if float(std) > 1e-12:
            z[nonempty] = (b - b.mean()) / std
    sign = 1.0 if config.segment_score_keeps_more else -1.0
    keep = base_keep + sign * config.r_var * z
    return _allocate_counts_host(lengths_h, keep, int(target))


# ------------------------------------------------------------------------------------------
# Eq. 4-5 on the device (the sync-free stage boundary)
# ------------------------------------------------------------------------------------------
def _cos_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """:func:`_cos` in torch (row-wise cosine, 0 when either vector is zero)."""
    num = (a * b).sum(-1)
    den = torch.sqrt((a * a).sum(-1)) * torch.sqrt((b * b).sum(-1))
    return torch.where(den > eps, num / den.clamp_min(eps), torch.zeros_like(num))


def segment_counts_on_device(sums: Optional[torch.Tensor], lengths: torch.Tensor, n: int,
                             target: int, config: HieraVidConfig) -> torch.Tensor:
    """:func:`segment_counts_from_sums` (Eq. 4-5 and the allocation) with every M-sized step
    on ``lengths``' device and nothing read back: int64 (M,) counts on that device.

    For a stage boundary inside the LLM on a GPU, where one read of the segment sums is a
    host synchronisation that drains the stream (the layers queued before it) and leaves the
    GPU idle while the host computes the counts and launches what follows. Here nothing
    waits: the counts, the greedy and the gathers are enqueued behind the layers.

    ``sums`` (M, C) float32 segment sums (:func:`segment_sums`; may be None when ``r_var`` is
    0 or M <= 1), ``lengths`` (M,) int64 tokens per segment on the device, ``n`` = their sum
    and ``target`` (host ints, 0 < target < n).

    The same formulas as the host path; what differs (our choice, documented): empty segments
    are masked instead of dropped (a zero row adds exact zeros to the neighbour sums, so the
    sums are the same), and the reconciliation shift tau is solved from the piecewise-linear
    form (breakpoints -keep_m and 1 - keep_m, all evaluated at once, interpolated on the
    piece that crosses ``target``, :func:`_shift_estimate`'s formula) instead of the host's
    bisection to the largest double. Both are deterministic; the counts agree with the
    host's except where the host and device round-off decide a tie: a y_m = len_m clip(keep_m
    + tau, 0, 1) within a few ulps of an integer (largest remainder gives that unit back:
    its fractional part is ~1), or two fractional parts equal to round-off at the cut (tests:
    exact equality on random inputs, the sum and bounds everywhere).
    """
    lengths = lengths.to(torch.int64)
    return segment_counts_on_device_many(sums, lengths, [lengths.shape[0]], [int(n)],
                                         [int(target)], config)


def segment_counts_on_device_many(sums: Optional[torch.Tensor], lengths: torch.Tensor,
                                  num_segments: Sequence[int], ns: Sequence[int],
                                  targets: Sequence[int], config: HieraVidConfig
                                  ) -> torch.Tensor:
    """:func:`segment_counts_on_device` for several videos at once (one stage boundary's
    group): their segments back to back, ``sums`` (S, C) (or None), ``lengths`` (S,) on the
    device, ``num_segments`` / ``ns`` / ``targets`` per video on the host (S = the sum of
    ``num_segments``). The videos are padded to the longest segment count with empty
    segments, which the formulas already mask (an empty segment adds exact zeros and
    breakpoints where F does not bend), and every step runs once for all of them: int64
    (S,) counts on the device, nothing read back. Each video's counts are those of
    :func:`segment_counts_on_device` alone except where round-off decides a tie (the padding
    can change how a sum over segments is associated), as there against the host."""
    dev = lengths.device
    lengths = lengths.to(torch.int64)
    Ms = [int(m) for m in num_segments]
    V, M = len(Ms), max(Ms) if Ms else 0
    for n, target in zip(ns, targets):
        if not 0 < target < n:
            raise ValueError(f"target must be in (0, {n}) here, got {target}")
    if sum(Ms) != lengths.shape[0]:
        raise ValueError(f"num_segments sum to {sum(Ms)}, lengths has {lengths.shape[0]}")
    if V == 0 or M == 0:
        raise ValueError("no segments")
    padded = any(m != M for m in Ms)
    if padded:   # (V, M) layout of the segments, -1 = padding (an empty segment)
        from .dpp import host_to_device
        pos = np.full((V, M), -1, dtype=np.int64)
        at = 0
        for v, m in enumerate(Ms):
            pos[v, :m] = np.arange(at, at + m)
            at += m
        pos_d = host_to_device(pos, dev)
        real = pos_d >= 0
        safe = pos_d.clamp_min(0)
        lengths_p = torch.where(real, lengths[safe], torch.zeros_like(lengths[safe]))
    else:
        lengths_p = lengths.view(V, M)
    if len(set(ns)) == 1 and len(set(targets)) == 1:
        target_f = float(targets[0])
        keep0 = float(targets[0]) / float(ns[0])
        target_i = int(targets[0])
    else:
        from .dpp import host_to_device
        tn = host_to_device(np.array([[t / n, t] for n, t in zip(ns, targets)],
                                     dtype=np.float64), dev)
        keep0, target_f = tn[:, :1], tn[:, 1]
        target_i = target_f.to(torch.int64)
    lf = lengths_p.to(torch.float64)
    nonempty = lengths_p > 0
    z = torch.zeros(V, M, dtype=torch.float64, device=dev)
    if sums is not None and M > 1 and config.r_var > 0:
        if config.missing_neighbor not in ("neutral", "zero"):
            raise ValueError("missing_neighbor must be 'neutral' or 'zero', got "
                             f"{config.missing_neighbor!r}")
        sums_p = sums.to(torch.float32)
        sums_p = sums_p[safe] if padded else sums_p.view(V, M, -1)
        # Eq. 4 on the non-empty segments (float32 means, as on the host, then float64)
        g = (sums_p / lengths_p.clamp_min(1).to(torch.float32)[..., None]).to(torch.float64)
        g = torch.where(nonempty[..., None], g, torch.zeros_like(g))
        csum = torch.cumsum(g, 1)
        s_l = _cos_rows(g, csum - g)                    # left neighbours' sum
        s_r = _cos_rows(g, csum[:, -1:] - csum)         # right neighbours' sum
        ar = torch.arange(M, device=dev).unsqueeze(0)
        cnt = nonempty.sum(1, keepdim=True)
        if config.missing_neighbor == "neutral":
            first = torch.where(nonempty, ar, torch.full_like(ar, M)).min(1, keepdim=True).values
            last = torch.where(nonempty, ar, torch.full_like(ar, -1)).max(1, keepdim=True).values
            den = (cnt - 1).clamp_min(1).to(torch.float64)
            mean_l = torch.where(nonempty & (ar != first), s_l,
                                 torch.zeros_like(s_l)).sum(1, keepdim=True) / den
            mean_r = torch.where(nonempty & (ar != last), s_r,
                                 torch.zeros_like(s_r)).sum(1, keepdim=True) / den
            s_l = torch.where(ar == first, mean_l, s_l)
            s_r = torch.where(ar == last, mean_r, s_r)
        b = config.lam * s_r + (1.0 - config.lam) * (1.0 - s_l)
        cf = cnt.clamp_min(1).to(torch.float64)
        bm = torch.where(nonempty, b, torch.zeros_like(b))
        mean = bm.sum(1, keepdim=True) / cf
        dev_b = torch.where(nonempty, b - mean, torch.zeros_like(b))
        std = torch.sqrt((dev_b * dev_b).sum(1, keepdim=True) / cf)   # population std
        ok = (std > 1e-12) & (cnt > 1)
        z = torch.where(ok & nonempty, dev_b / torch.where(ok, std, torch.ones_like(std)), z)
    sign = 1.0 if config.segment_score_keeps_more else -1.0
    keep = keep0 + sign * config.r_var * z
    tcol = target_f if isinstance(target_f, float) else target_f.unsqueeze(1)
    # the shift tau with sum_m lf_m clip(keep_m + tau, 0, 1) = target: F is nondecreasing and
    # piecewise linear between the breakpoints, F(first) = 0 <= target < n = F(last)
    P = torch.sort(torch.cat((-keep, 1.0 - keep), 1), dim=1).values              # (V, 2M)
    F = (lf[:, None, :] * torch.clamp(keep[:, None, :] + P[:, :, None], 0.0, 1.0)).sum(2)
    i = ((F <= tcol).sum(1, keepdim=True) - 1).clamp(0, 2 * M - 2)
    ii = torch.cat((i, i + 1), 1)              # a tensor index, not P[i]: that reads i back
    p0, p1 = P.gather(1, ii).unbind(1)
    f0, f1 = F.gather(1, ii).unbind(1)
    slope_ok = f1 > f0
    tau = p0 + (target_f - f0) * (p1 - p0) / torch.where(slope_ok, f1 - f0, torch.ones_like(f1))
    y = lf * torch.clamp(keep + tau.unsqueeze(1), 0.0, 1.0)
    # largest remainder, ties by lower index, never above len_m (the host's rule)
    base = torch.minimum(torch.floor(y).to(torch.int64), lengths_p)
    tgt = target_i if isinstance(target_i, int) else target_i.unsqueeze(1)
    r = tgt - base.sum(1, keepdim=True)
    frac = y - base.to(torch.float64)
    eligible = base < lengths_p
    order = torch.sort(torch.where(eligible, -frac, torch.full_like(frac, math.inf)), dim=1,
                       stable=True).indices
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(M, device=dev).unsqueeze(0).expand(V, M).contiguous())
    give = torch.minimum(r.clamp_min(0), eligible.sum(1, keepdim=True))
    counts = base + (rank < give).to(torch.int64)
    # round-off leftovers (either sign) in index order, within [0, len_m]
    left = tgt - counts.sum(1, keepdim=True)
    cap = lengths_p - counts
    before = torch.cumsum(cap, 1) - cap
    counts = counts + torch.minimum((left - before).clamp_min(0), cap)
    over = (-left).clamp_min(0)
    before = torch.cumsum(counts, 1) - counts
    counts = counts - torch.minimum((over - before).clamp_min(0), counts)
    if padded:
        from .dpp import host_to_device
        flat = np.concatenate([v * M + np.arange(m) for v, m in enumerate(Ms)])
        return counts.reshape(-1)[host_to_device(flat, dev)]
    return counts.reshape(-1)
