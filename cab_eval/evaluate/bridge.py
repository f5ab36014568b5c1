"""``cab eval bridge``: the bridge experiment (the N=100 two-community graph on which curvature-aware
selection was first argued), at token level, at block level, and under weak cross-community noise.

**Token level (the original experiment, reproduced exactly).** ``networkx.stochastic_block_model([50, 50],
[[0.9, 0], [0, 0.9]], seed=42)``; after ``numpy.random.seed(42)`` one draw
``clip(normal(1.0, 0.1), 0.1, 2.0)`` per edge in ``G.edges()`` order, written to ``A[u, v]`` and
``A[v, u]`` (float32); the bridge ``A[0, 99] = A[99, 0] = 0.001``; strength ``S`` = row sums;
``F = 4A - S_i - S_j + 3 A @ A`` where ``A > 0`` and 1000 elsewhere (diagonal included). With
``k = int((1 - s) N^2)``, "H2O" keeps the entries ``>=`` the k-th largest weight and CAB the entries
``<=`` the k-th smallest ``F`` (global top-k over all ``N^2`` entries, ties kept); the bridge is
retrieved when ``mask[0, 99]``.

**Block level (through the library).** Every node becomes a block of ``block_size`` tokens whose
loudest (max-L2) token carries the node's vectors, built so that the library's coarse affinity
``relu(qc_i . kc_j * scale)`` *is* ``A`` (one-hot keys, queries = rows of ``A``); the other tokens of a
block are quieter scaled copies plus noise. The library's selectors then choose blocks with their
per-row budget ``k_i = min(v_i, max(2, ceil((1 - s) v_i)))`` (sink block 0 and the diagonal forced);
the bridge is retrieved when query block 0 keeps key block 99. The graph is undirected, so this runs
non-causally (``causal=False``): in causal mode the bridge would land in the always-kept sink column.
Differences from the token-level toy, which the summary reports: the library treats every causally
valid block pair as an edge (a zero-affinity pair is a zero-weight edge, not a non-edge scored 1000),
budgets are per row, and the strengths are out-strength (row) and in-strength (column).

**Noise sweep.** For each noise level ``n`` (0, 5, 20, 100) and seed (SBM seed, numpy weight seed and
the noise placement all from one seed; seed 42 with ``n = 0`` is the experiment above), ``n`` distinct
cross-community pairs other than the bridge get weight 0.001 (both directions). Reported: the bridge's
rank in ascending ``F`` over all ``N^2`` entries (1 = lowest), and per method and sparsity the share of
seeds that retrieve the bridge, with 95% Wilson intervals.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .report import RowsFile, bootstrap_ci, comma_floats, comma_ints, environment, markdown_table, wilson, write_csv, write_json, write_summary
from .text import format_selector_spec

N_NODES = 100
COMMUNITY = 50
P_IN = 0.9
BRIDGE = (0, 99)
BRIDGE_WEIGHT = 0.001
NOISE_WEIGHT = 0.001
NON_EDGE_SCORE = 1000.0
DEFAULT_SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.99)
DEFAULT_NOISE = (0, 5, 20, 100)

# Block-level selectors: (selector, options); a method's label is format_selector_spec of the pair.
_FORMAN_LOW = {"score": "forman", "keep": "lowest", "coarsen": "max_l2"}  # CAB's first formulation
_BLOCK_SPECS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("magnitude", {}),
    ("cab", _FORMAN_LOW),
    # edges="positive": zero-affinity block pairs rank last, as the toy's non-edges (score 1000) do.
    ("cab", {**_FORMAN_LOW, "edges": "positive"}),
    ("cab", {**_FORMAN_LOW, "keep": "highest"}),
    ("cab", {"score": "triangle", "keep": "lowest", "coarsen": "max_l2"}),
    ("cab", {"score": "triangle", "keep": "highest", "coarsen": "max_l2"}),
    ("streaming", {}),
    ("random", {"seed": 0}),
    ("antidiagonal", {}),
    ("oracle", {}),
)
BLOCK_METHODS: tuple[tuple[str, str, dict[str, Any]], ...] = tuple(
    (format_selector_spec(name, opts), name, opts) for name, opts in _BLOCK_SPECS)
SWEEP_BLOCK_METHODS = tuple(BLOCK_METHODS[i][0] for i in (0, 1, 2, 3))  # magnitude and three Forman variants


# ----------------------------------------------------------------------------------------------------
# Token level: the original experiment.


def sbm_weights(seed: int = 42, noise_edges: int = 0, noise_seed: int | None = None) -> np.ndarray:
    """The bridge experiment's weighted SBM adjacency ``[N, N]`` float32, with the bridge and ``noise_edges`` weak
    cross-community edges.

    ``seed`` drives the SBM and (through ``numpy.random.seed``) the weight draws, exactly as the original experiment did;
    the noise pairs come from ``numpy.random.default_rng(noise_seed)`` (default: ``seed``).
    """
    import networkx as nx

    if isinstance(noise_edges, bool) or not isinstance(noise_edges, int) or noise_edges < 0:
        raise ValueError(f"noise_edges must be a non-negative int, got {noise_edges!r}")
    max_noise = COMMUNITY * COMMUNITY - 1
    if noise_edges > max_noise:
        raise ValueError(f"noise_edges must be at most {max_noise} (cross-community pairs), got {noise_edges}")
    g = nx.stochastic_block_model([COMMUNITY, COMMUNITY], [[P_IN, 0.0], [0.0, P_IN]], seed=seed)
    np.random.seed(seed)
    a = np.zeros((N_NODES, N_NODES), dtype=np.float32)
    for u, v in g.edges():
        w = np.clip(np.random.normal(1.0, 0.1), 0.1, 2.0)
        a[u, v] = w
        a[v, u] = w
    a[BRIDGE] = a[BRIDGE[::-1]] = BRIDGE_WEIGHT
    if noise_edges:
        rng = np.random.default_rng(seed if noise_seed is None else noise_seed)
        pairs = [(u, v) for u in range(COMMUNITY) for v in range(COMMUNITY, N_NODES) if (u, v) != BRIDGE]
        for idx in rng.choice(len(pairs), size=noise_edges, replace=False):
            u, v = pairs[int(idx)]
            a[u, v] = a[v, u] = NOISE_WEIGHT
    return a


def forman_scores(a: np.ndarray) -> np.ndarray:
    """``F = 4A - S_i - S_j + 3 A @ A`` where ``A > 0``, ``NON_EDGE_SCORE`` elsewhere (float32)."""
    s = a.sum(1)
    f = 4 * a - s[:, None] - s[None, :] + 3 * (a @ a)
    return np.where(a > 0, f, np.float32(NON_EDGE_SCORE)).astype(np.float32)


def budget_k(sparsity: float, n: int = N_NODES) -> int:
    """``int((1 - s) N^2)``, the original experiment's global budget (Python float arithmetic, as it was computed there)."""
    return int((1 - sparsity) * n * n)


def h2o_mask(a: np.ndarray, k: int) -> np.ndarray:
    """Entries ``>=`` the k-th largest weight (ties kept)."""
    kth = np.sort(a.ravel())[::-1][k - 1]
    return a >= kth


def cab_mask(f: np.ndarray, k: int) -> np.ndarray:
    """Entries ``<=`` the k-th smallest ``F`` (ties kept)."""
    kth = np.sort(f.ravel())[k - 1]
    return f <= kth


def bridge_rank(f: np.ndarray) -> int:
    """1 + the number of entries with strictly lower ``F`` than the bridge."""
    return int((f < f[BRIDGE]).sum()) + 1


def token_level(a: np.ndarray, sparsities: Sequence[float]) -> dict[str, Any]:
    f = forman_scores(a)
    out: dict[str, Any] = {
        "edges_directed": int((a > 0).sum()),
        "bridge_curvature": float(f[BRIDGE]),
        "bridge_rank": bridge_rank(f),
        "retrieved": {"h2o": {}, "cab": {}},
        "rows": [],
    }
    for s in sparsities:
        k = budget_k(s)
        if k < 1:
            raise ValueError(f"sparsities must leave at least one entry (int((1 - s) * {N_NODES ** 2}) >= 1), got {s}")
        hm, cm = h2o_mask(a, k), cab_mask(f, k)
        key = _key(s)
        out["retrieved"]["h2o"][key] = bool(hm[BRIDGE])
        out["retrieved"]["cab"][key] = bool(cm[BRIDGE])
        out["rows"].append(
            {
                "sparsity": float(s),
                "k": k,
                "h2o_kept": int(hm.sum()),
                "cab_kept": int(cm.sum()),
                "h2o_bridge": "retrieved" if hm[BRIDGE] else "lost",
                "cab_bridge": "retrieved" if cm[BRIDGE] else "lost",
            }
        )
    return out


def _key(s: float) -> str:
    return format(float(s), "g")


# ----------------------------------------------------------------------------------------------------
# Block level: the same graph through the library's pipeline.


def graph_qk(a: np.ndarray, block_size: int, head_dim: int = 128, seed: int = 0, quiet: float = 0.5):
    """Token-level q, k ``[1, 1, N * block_size, head_dim]`` float32 whose coarse (max-L2) block affinity is ``a``.

    Node ``i`` is block ``i``; its first token is the loud representative (query ``a[i] * sqrt(D)``, key
    ``e_i``), so ``qc_i . kc_j / sqrt(D) = a[i, j]``. The other tokens are ``quiet`` times the
    representative plus noise of norm about ``0.05 * quiet`` (so the representative keeps the largest norm).
    """
    n = a.shape[0]
    if head_dim < n:
        raise ValueError(f"head_dim must be at least the number of nodes ({n}), got {head_dim}")
    gen = torch.Generator().manual_seed(seed)
    qn = torch.zeros(n, head_dim)
    qn[:, :n] = torch.from_numpy(a.astype(np.float32)) * head_dim**0.5
    kn = torch.zeros(n, head_dim)
    kn[:, :n] = torch.eye(n)
    q = qn[:, None, :].repeat(1, block_size, 1)
    k = kn[:, None, :].repeat(1, block_size, 1)
    if block_size > 1:
        sd = 0.05 * quiet / head_dim**0.5
        qnorm = qn.norm(dim=-1, keepdim=True)[:, None]
        q[:, 1:] = quiet * q[:, 1:] + sd * qnorm * torch.randn(n, block_size - 1, head_dim, generator=gen)
        k[:, 1:] = quiet * k[:, 1:] + sd * torch.randn(n, block_size - 1, head_dim, generator=gen)
    return q.reshape(1, 1, n * block_size, head_dim), k.reshape(1, 1, n * block_size, head_dim)


def block_level(
    a: np.ndarray, sparsities: Sequence[float], block_size: int, methods: Sequence[str] | None = None, device: str = "cpu"
) -> dict[str, Any]:
    """Run the library's selectors on the graph; which of them keep the bridge block."""
    from cab_attention.geometry import BlockGrid
    from cab_attention import select_blocks
    from cab_attention.options import FORMAN_KEEP_LOWEST_MAXL2

    table = {m[0]: m for m in BLOCK_METHODS}
    names = list(methods) if methods is not None else list(table)
    unknown = [m for m in names if m not in table]
    if unknown:
        raise ValueError(f"methods must be among {sorted(table)}, got {unknown}")
    q, k = graph_qk(a, block_size)
    q, k = q.to(device), k.to(device)
    i, j = BRIDGE
    out: dict[str, Any] = {"block_size": block_size, "retrieved": {}, "row_budget": {}, "bridge_row_rank": {}}
    # The library's own curvature of the bridge block edge (on the coarse graph it builds).
    grid = BlockGrid.of(q, k, block_size, False)
    d = select_blocks(q, k, selector="cab", sparsity=0.9, block_size=block_size, causal=False, return_diagnostics=True,
                      **FORMAN_KEEP_LOWEST_MAXL2).diagnostics
    out["bridge_curvature_library"] = float(d["scores"][0, 0, i, j])
    out["coarse_affinity_error"] = float((d["A"][0, 0].cpu() - torch.from_numpy(a)).abs().max())
    for s in sparsities:
        key = _key(s)
        out["row_budget"][key] = int(grid.budget(s)[i])
        for name in names:
            _, selector, opts = table[name]
            if selector == "antidiagonal":
                opts = {"stride": min(8, block_size), **opts}
            sel = select_blocks(q, k, selector=selector, sparsity=s, block_size=block_size, causal=False,
                                return_diagnostics=True, **opts)
            out["retrieved"].setdefault(name, {})[key] = bool(sel.mask[0, 0, i, j])
            # Rank of the bridge among row i's unforced blocks in the library's own order (1 = first
            # pick; includes the tie-break and any demotion, e.g. edges="positive").
            order = sel.diagnostics["order"][0, 0, i].cpu()
            n_forced = int(grid.forced()[i].sum())
            out["bridge_row_rank"].setdefault(name, {})[key] = int((order == j).nonzero()[0, 0]) - n_forced + 1
            out.setdefault("density", {}).setdefault(name, {})[key] = sel.density
    return out


# ----------------------------------------------------------------------------------------------------
# Noise sweep.


def noise_sweep(
    noise_levels: Sequence[int],
    seeds: Sequence[int],
    sparsities: Sequence[float],
    block_size: int,
    progress: bool = True,
    device: str = "cpu",
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Bridge rank and retrieval per noise level and seed; ``on_row`` gets each seed's row as it is done
    (``cab eval bridge`` appends it to ``bridge_noise_sweep.csv``, so an interrupted sweep keeps it)."""
    from tqdm.auto import tqdm

    per_seed: list[dict[str, Any]] = []
    jobs = [(n, s) for n in noise_levels for s in seeds]
    for n, seed in tqdm(jobs, desc="bridge noise sweep", disable=not progress, file=sys.stderr):
        a = sbm_weights(seed, noise_edges=int(n))
        f = forman_scores(a)
        row: dict[str, Any] = {"noise_edges": int(n), "seed": int(seed), "bridge_rank": bridge_rank(f),
                               "bridge_curvature": float(f[BRIDGE])}
        tl = token_level(a, sparsities)
        bl = block_level(a, sparsities, block_size, SWEEP_BLOCK_METHODS, device=device)
        for s in sparsities:
            key = _key(s)
            row[f"h2o@{key}"] = tl["retrieved"]["h2o"][key]
            row[f"cab@{key}"] = tl["retrieved"]["cab"][key]
            for m in SWEEP_BLOCK_METHODS:
                row[f"block-{m}@{key}"] = bl["retrieved"][m][key]
        per_seed.append(row)
        if on_row is not None:
            on_row(row)
    methods = ["h2o", "cab"] + [f"block-{m}" for m in SWEEP_BLOCK_METHODS]
    summary = []
    for n in noise_levels:
        rows = [r for r in per_seed if r["noise_edges"] == n]
        ranks = [r["bridge_rank"] for r in rows]
        mean, lo, hi = bootstrap_ci(ranks)
        entry: dict[str, Any] = {
            "noise_edges": int(n),
            "seeds": len(rows),
            "rank_mean": mean,
            "rank_ci": [lo, hi],
            "rank_median": float(np.median(ranks)),
            "rank_min": int(min(ranks)),
            "rank_max": int(max(ranks)),
            "retrieval": {},
        }
        for m in methods:
            for s in sparsities:
                key = _key(s)
                c = sum(bool(r[f"{m}@{key}"]) for r in rows)
                lo_w, hi_w = wilson(c, len(rows))
                entry["retrieval"].setdefault(m, {})[key] = {"rate": c / len(rows), "ci": [lo_w, hi_w], "retrieved": c, "total": len(rows)}
        summary.append(entry)
    return {"seeds": list(map(int, seeds)), "per_seed": per_seed, "summary": summary, "methods": methods}


# ----------------------------------------------------------------------------------------------------
# Plots and report.


def _plots(out: Path, a: np.ndarray, result: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plotting import coincidences, legend_label, line_style

    files = []
    f = forman_scores(a)
    edges = f[a > 0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].hist(edges, bins=60, color="0.6")
    axes[0].axvline(f[BRIDGE], color="crimson", label=f"bridge F = {f[BRIDGE]:.2f}")
    axes[0].set_xlabel("augmented Forman curvature F (edges)")
    axes[0].set_ylabel("directed edges")
    axes[0].legend()
    axes[0].set_title("Token level: curvature of every edge")
    ws = a[a > 0]
    axes[1].hist(ws, bins=60, color="0.6")
    axes[1].axvline(a[BRIDGE], color="crimson", label=f"bridge w = {a[BRIDGE]:g}")
    axes[1].set_xlabel("edge weight A")
    axes[1].legend()
    axes[1].set_title("Token level: weights (H2O ranks by these)")
    fig.tight_layout()
    p = out / "bridge_token_level.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    files.append(p.name)

    bl = result["block_level"]
    names = list(bl["retrieved"])
    sps = list(bl["retrieved"][names[0]])
    grid = np.array([[bl["retrieved"][m][s] for s in sps] for m in names], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 * len(sps) + 3, 0.45 * len(names) + 1.5))
    ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(sps)), [f"s={s}" for s in sps])
    ax.set_yticks(range(len(names)), names)
    for r in range(len(names)):
        for c in range(len(sps)):
            ax.text(c, r, "kept" if grid[r, c] else "lost", ha="center", va="center", fontsize=8)
    ax.set_title(f"Block level (block {bl['block_size']}): bridge block kept?")
    fig.tight_layout()
    p = out / "bridge_block_level.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    files.append(p.name)

    sw = result["noise_sweep"]["summary"]
    ns = [e["noise_edges"] for e in sw]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    med = [e["rank_median"] for e in sw]
    lo = [e["rank_min"] for e in sw]
    hi = [e["rank_max"] for e in sw]
    axes[0].plot(range(len(ns)), med, "o-", label="median")
    axes[0].fill_between(range(len(ns)), lo, hi, alpha=0.2, label="min-max over seeds")
    axes[0].set_xticks(range(len(ns)), [str(n) for n in ns])
    axes[0].set_xlabel("weak cross-community noise edges")
    axes[0].set_ylabel("bridge rank in ascending F (1 = lowest)")
    axes[0].set_yscale("log")
    axes[0].legend()
    # The highest sparsity: the smallest budget, where noise edges can push the bridge out.
    s_show = max(sw[0]["retrieval"]["cab"], key=float)
    rates = {m: [e["retrieval"][m][s_show]["rate"] for e in sw] for m in result["noise_sweep"]["methods"]}
    same = coincidences(rates)
    for i, m in enumerate(rates):
        r = [e["retrieval"][m][s_show] for e in sw]
        # Clamped at 0: a Wilson bound can miss the rate by a rounding error at 0 or 1.
        err = np.array([[x["rate"] - x["ci"][0] for x in r], [x["ci"][1] - x["rate"] for x in r]]).clip(min=0)
        axes[1].errorbar(range(len(ns)), rates[m], yerr=err, capsize=3, label=legend_label(m, same), **line_style(i))
    axes[1].set_xticks(range(len(ns)), [str(n) for n in ns])
    axes[1].set_xlabel("weak cross-community noise edges")
    axes[1].set_ylabel(f"bridge retrieval rate at s={s_show} (95% Wilson)")
    axes[1].set_ylim(-0.05, 1.05)
    axes[1].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    fig.tight_layout()
    p = out / "bridge_noise_sweep.png"
    fig.savefig(p, dpi=120, bbox_inches="tight")
    plt.close(fig)
    files.append(p.name)
    return files


def _summary_md(result: dict[str, Any]) -> str:
    tl = result["token_level"]
    bl = result["block_level"]
    sw = result["noise_sweep"]
    lines = [
        "## Token level (the original experiment)\n",
        f"{tl['edges_directed']} directed edges; bridge curvature F[0, 99] = **{tl['bridge_curvature']:.2f}** "
        f"(rank {tl['bridge_rank']} of {N_NODES ** 2} in ascending F). Global budget k = int((1 - s) N^2); "
        "ties at the k-th value are kept, so the kept count can exceed k (at s = 0.5, k exceeds the number of "
        "edges, the k-th largest weight is 0 and H2O keeps everything).\n",
        markdown_table(tl["rows"]),
        f"\n## Block level (library pipeline, node = block of {bl['block_size']} tokens, causal=False)\n",
        f"The library's coarse affinity reproduces A to {bl['coarse_affinity_error']:.1e}; its Forman score of the "
        f"bridge block edge is {bl['bridge_curvature_library']:.2f}. Per-row budget of query block 0: "
        + ", ".join(f"{b} blocks at s={s}" for s, b in bl["row_budget"].items())
        + ". Cell: kept/lost (rank of the bridge block among row 0's unforced blocks by the selector's priority, "
        "1 = first; ties go to the larger block index). `streaming` keeps it only because, non-causally, block 99 "
        "is the 'most recent' one.\n",
    ]
    rows = []
    for m, d in bl["retrieved"].items():
        row = {"selector": m}
        for s, kept in d.items():
            row[f"s={s}"] = f"{'kept' if kept else 'lost'} ({bl['bridge_row_rank'][m][s]})"
        rows.append(row)
    lines.append(markdown_table(rows))
    lines.append(
        "\nIn the library every causally valid block pair is an edge: a cross-community pair with zero affinity is a "
        "zero-weight edge whose Forman score is -S_i - S_j, as low as the bridge's. The token-level toy scores "
        "those pairs 1000 (non-edges); that exclusion, not the curvature itself, is what isolates the bridge there.\n"
    )
    lines.append(f"\n## Noise sweep ({len(sw['seeds'])} seeds per point; the random seed drives SBM, weights and noise placement)\n")
    srows = []
    sps = list(sw["summary"][0]["retrieval"]["cab"])
    for e in sw["summary"]:
        row = {"noise edges": e["noise_edges"], "bridge rank median [min, max]": f"{e['rank_median']:.0f} [{e['rank_min']}, {e['rank_max']}]",
               "rank mean [95% CI]": f"{e['rank_mean']:.1f} [{e['rank_ci'][0]:.1f}, {e['rank_ci'][1]:.1f}]"}
        srows.append(row)
    lines.append(markdown_table(srows))
    lines.append("\nRetrieval rate (95% Wilson interval) per method and sparsity:\n\n")
    rrows = []
    for e in sw["summary"]:
        for m in sw["methods"]:
            row = {"noise edges": e["noise_edges"], "method": m}
            for s in sps:
                r = e["retrieval"][m][s]
                row[f"s={s}"] = f"{r['rate']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]"
            rrows.append(row)
    lines.append(markdown_table(rrows))
    lines.append(f"\nFiles: {', '.join(result['files'])}. Took {result['seconds']:.1f} s.\n")
    return "".join(lines)


def run(
    out: Path,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    noise_levels: Sequence[int] = DEFAULT_NOISE,
    seeds: int = 20,
    block_size: int = 16,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """The whole bridge evaluation; writes JSON, CSV, PNG and a markdown summary into ``out``."""
    for s in sparsities:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0.0 <= s < 1.0):
            raise ValueError(f"sparsities must be numbers in [0, 1), got {s!r}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive int, got {seeds!r}")
    for n in noise_levels:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"noise must be non-negative ints, got {n!r}")
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    a = sbm_weights(42)
    result: dict[str, Any] = {"environment": environment()}
    tl = token_level(a, sparsities)
    result["bridge_curvature"] = tl["bridge_curvature"]
    result["retrieved"] = tl["retrieved"]
    result["token_level"] = tl
    result["block_level"] = block_level(a, sparsities, block_size, device=device)
    seed_list = list(range(42, 42 + seeds))
    sweep_file = RowsFile(out / "bridge_noise_sweep.csv")
    sweep_file.start(resume=False)
    result["noise_sweep"] = noise_sweep(noise_levels, seed_list, sparsities, block_size, progress, device,
                                        on_row=lambda r: sweep_file.append([r]))
    result["files"] = ["bridge.json", "bridge_token_level.csv", "bridge_block_level.csv", "bridge_noise_sweep.csv",
                       "summary.md"]
    result["files"] += _plots(out, a, result)
    result["seconds"] = time.perf_counter() - t0
    write_csv(out / "bridge_token_level.csv", tl["rows"])
    bl = result["block_level"]
    write_csv(out / "bridge_block_level.csv", [
        {"selector": m, "sparsity": s, "retrieved": kept, "bridge_row_rank": bl["bridge_row_rank"][m][s],
         "row_budget": bl["row_budget"][s], "density": bl["density"][m][s]}
        for m, d in bl["retrieved"].items() for s, kept in d.items()
    ])
    write_json(out / "bridge.json", result)
    write_summary(out / "summary.md", "Bridge experiment (N=100 two-community graph)", _summary_md(result), result["environment"])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cab eval bridge", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bridge", help="output folder (default runs/bridge)")
    p.add_argument("--sparsities", type=comma_floats, default=list(DEFAULT_SPARSITIES))
    p.add_argument("--noise", type=comma_ints, default=list(DEFAULT_NOISE), help="noise-edge counts of the sweep")
    p.add_argument("--seeds", type=int, default=None, help="seeds per sweep point (default 20 on CPU, 200 with cuda)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per node at block level")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda: 200 seeds per point)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {args.device!r}")
    seeds = args.seeds if args.seeds is not None else (200 if args.device.startswith("cuda") else 20)
    res = run(Path(args.out), args.sparsities, args.noise, seeds, args.block_size, args.device, not args.no_progress)
    if args.json:
        keep = ("bridge_curvature", "retrieved", "token_level", "block_level", "environment")
        print(json.dumps({k: res[k] for k in keep} | {"noise_sweep": res["noise_sweep"]["summary"]}, default=float))
        return 0
    tl = res["token_level"]
    print(f"bridge curvature F[0,99] = {res['bridge_curvature']:.2f}  (rank {tl['bridge_rank']} of {N_NODES ** 2}; "
          f"{tl['edges_directed']} directed edges)")
    print(f"{'sparsity':>8} {'k':>5}  {'H2O':>9}  {'CAB':>9}")
    for r in tl["rows"]:
        print(f"{r['sparsity']:>8g} {r['k']:>5}  {r['h2o_bridge']:>9}  {r['cab_bridge']:>9}")
    bl = res["block_level"]
    print(f"\nblock level (block {bl['block_size']}, library selectors, causal=False): bridge block kept?")
    sps = list(bl["row_budget"])
    width = max(len(m) for m in bl["retrieved"])
    print(f"{'selector':>{width}} " + " ".join(f"{'s=' + s:>7}" for s in sps))
    for m, d in bl["retrieved"].items():
        print(f"{m:>{width}} " + " ".join(f"{('kept' if d[s] else 'lost'):>7}" for s in sps))
    shown = sorted(sps, key=float)[-2:]
    print(f"\nnoise sweep ({len(res['noise_sweep']['seeds'])} seeds per point): bridge rank median [min, max]; "
          "retrieval rate at s=" + " / ".join(shown))
    for e in res["noise_sweep"]["summary"]:
        rates = "  ".join(f"{m}=" + "/".join(f"{e['retrieval'][m][s]['rate']:.2f}" for s in shown)
                          for m in res["noise_sweep"]["methods"])
        print(f"  noise={e['noise_edges']:>3}: rank {e['rank_median']:>3.0f} [{e['rank_min']:>2}, {e['rank_max']:>3}]  {rates}")
    print(f"\nwrote {args.out}/ ({', '.join(res['files'])}) in {res['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
