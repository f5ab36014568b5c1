"""The methods a passkey (or RULER-style) comparison runs: a selector spec at one sparsity each
(:class:`Method`), built from spec strings and sparsity levels by :func:`build_methods`; ``dense`` runs
once, at sparsity 0."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .text import format_selector_spec, parse_selector_spec


@dataclass(frozen=True)
class Method:
    """One column of the comparison: a selector spec at one sparsity (``dense`` runs once, at 0)."""

    spec: str
    selector: str
    options: tuple[tuple[str, Any], ...]
    sparsity: float

    @property
    def label(self) -> str:
        return self.spec if self.selector == "dense" else f"{self.spec}@{self.sparsity:g}"


def build_methods(specs: Sequence[str], sparsities: Sequence[float]) -> list[Method]:
    """Methods for each selector spec and sparsity; ``ValueError`` on a bad spec or sparsity."""
    methods: list[Method] = []
    for s in sparsities:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= float(s) < 1.0:
            raise ValueError(f"sparsities must be numbers in [0, 1), got {s!r}")
    for spec in specs:
        name, opts = parse_selector_spec(spec)
        label = format_selector_spec(name, opts)
        frozen = tuple(sorted(opts.items()))
        levels = [0.0] if name == "dense" else [float(s) for s in sparsities]
        for s in levels:
            m = Method(label, name, frozen, s)
            if m not in methods:
                methods.append(m)
    if not methods:
        raise ValueError("selectors must name at least one selector")
    return methods
