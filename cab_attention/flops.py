"""Operation counts for the predictor and the attention it drives (multiply-add = 2 FLOPs)."""

from __future__ import annotations

import math

from .geometry import BlockGrid


def estimate_flops(
    n: int,
    num_heads: int,
    head_dim: int,
    *,
    num_kv_heads: int | None = None,
    block_size: int = 64,
    sparsity: float = 0.9,
    batch: int = 1,
    causal: bool = True,
    selector: str = "cab",
    score: str = "triangle",
) -> dict[str, float]:
    """Estimate FLOPs of one prefill attention call.

    Returns a dict: ``coarsen`` (norms of every q and k token), ``affinity`` (``M x M x D`` per query
    head), ``redundancy`` (``A @ A``, ``M^3`` per query head, cab only), ``curvature`` (elementwise),
    ``predictor`` (their sum), ``attention_dense`` and ``attention_sparse`` (``4 N^2 D`` per head,
    halved when causal, times the exact share of blocks the budget rule keeps) and ``total_sparse`` (predictor + sparse).
    """
    hkv = num_kv_heads or num_heads
    m = math.ceil(n / block_size)
    pairs = m * (m + 1) / 2 if causal else m * m
    coarsen = batch * (num_heads + hkv) * n * head_dim * 2
    affinity = batch * num_heads * pairs * head_dim * 2
    redundancy = 0.0
    curvature = 0.0
    if selector == "cab":
        # Causal A is lower triangular: A @ A costs ~M^3 / 3 multiply-adds.
        redundancy = batch * num_heads * (m**3 / 3 if causal else m**3) * 2
        curvature = batch * num_heads * pairs * (6 if score == "forman" else 3)
    elif selector == "antidiagonal":
        affinity = batch * num_heads * (pairs * block_size / 8 * block_size / 8) * head_dim * 8 * 2
    elif selector == "oracle":
        affinity = batch * num_heads * (n * n / (2 if causal else 1)) * head_dim * 2
    elif selector in ("streaming", "random", "dense"):
        affinity = 0.0
        coarsen = 0.0
    predictor = coarsen + affinity + redundancy + curvature
    dense = batch * num_heads * 4 * n * n * head_dim / (2 if causal else 1)
    # The exact share of causally valid blocks that the budget rule keeps (sink and diagonal included).
    grid = BlockGrid(1, 1, 1, n, n, head_dim, block_size, causal)
    sparse = dense * int(grid.budget(sparsity).sum()) / int(grid.valid().sum())
    return {
        "coarsen": float(coarsen),
        "affinity": float(affinity),
        "redundancy": float(redundancy),
        "curvature": float(curvature),
        "predictor": float(predictor),
        "attention_dense": float(dense),
        "attention_sparse": float(sparse),
        "total_sparse": float(predictor + sparse),
    }
