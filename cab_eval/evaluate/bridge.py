"""``cab eval bridge``: the bridge experiment (the N=100 two-community graph on which curvature-aware
selection was first argued), at token level, at block level, and under weak cross-community noise.

This module is the command (:func:`run`, :func:`main`); each part lives beside it, its docstring says
exactly what it does, and its public names are re-exported here:

* :mod:`.bridge_token_level`: the weighted SBM graph with its bridge, the augmented Forman curvature and
  the original token-level experiment (H2O keeps the heaviest entries, CAB the lowest curvature);
* :mod:`.bridge_block_level`: every node a block of tokens, the library's selectors on it;
* :mod:`.bridge_noise_sweep`: weak cross-community noise edges, bridge rank and retrieval per seed;
* :mod:`.bridge_report`: the plots and the markdown summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

from .bridge_block_level import BLOCK_METHODS, SWEEP_BLOCK_METHODS, block_level, graph_qk
from .bridge_noise_sweep import noise_sweep
from .bridge_report import summary_markdown, write_plots
from .bridge_token_level import (
    BRIDGE, BRIDGE_WEIGHT, COMMUNITY, N_NODES, NOISE_WEIGHT, NON_EDGE_SCORE, P_IN, bridge_rank, budget_k, cab_mask,
    forman_scores, h2o_mask, sbm_weights, sparsity_key, token_level,
)
from .report import RowsFile, comma_floats, comma_ints, environment, write_csv, write_json, write_summary

__all__ = [
    "BLOCK_METHODS", "BRIDGE", "BRIDGE_WEIGHT", "COMMUNITY", "DEFAULT_NOISE", "DEFAULT_SPARSITIES", "N_NODES",
    "NOISE_WEIGHT", "NON_EDGE_SCORE", "P_IN", "SWEEP_BLOCK_METHODS", "block_level", "bridge_rank", "budget_k",
    "cab_mask", "forman_scores", "graph_qk", "h2o_mask", "main", "noise_sweep", "run", "sbm_weights",
    "sparsity_key", "summary_markdown", "token_level", "write_plots",
]

DEFAULT_SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.99)
DEFAULT_NOISE = (0, 5, 20, 100)


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
    result["files"] += write_plots(out, a, result)
    result["seconds"] = time.perf_counter() - t0
    write_csv(out / "bridge_token_level.csv", tl["rows"])
    bl = result["block_level"]
    write_csv(out / "bridge_block_level.csv", [
        {"selector": m, "sparsity": s, "retrieved": kept, "bridge_row_rank": bl["bridge_row_rank"][m][s],
         "row_budget": bl["row_budget"][s], "density": bl["density"][m][s]}
        for m, d in bl["retrieved"].items() for s, kept in d.items()
    ])
    write_json(out / "bridge.json", result)
    write_summary(out / "summary.md", "Bridge experiment (N=100 two-community graph)", summary_markdown(result), result["environment"])
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
