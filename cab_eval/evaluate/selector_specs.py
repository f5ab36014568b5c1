"""Selector configurations as spec strings: ``[label@]name[:opt=value,...]`` -> :class:`Config`.

A configuration is a selector's name and its options (``cab:keep=highest``, ``cab:score=triangle,lam=0``,
``magnitude:coarsen=mean``; the ``name:options`` part is parsed by
:func:`cab_eval.evaluate.text.parse_selector_spec`, which checks names and options against the library),
optionally labelled with ``label@spec`` (``cab-high@cab:keep=highest``). Without a label the label is the
spec's one canonical spelling, so every table, plot and JSON file names a configuration the same way.
``cab eval recall`` and ``cab eval ppl`` read their ``--configs`` / ``--selectors`` through here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Config:
    """One selector configuration: a label, the selector's name and its options."""

    label: str
    selector: str
    options: dict[str, Any] = field(default_factory=dict, hash=False)


def parse_spec(spec: str) -> Config:
    """``[label@]selector[:opt=value,...]`` -> :class:`Config`, options checked by the library.

    Without a label the label is :func:`cab_eval.evaluate.text.format_selector_spec` of the spec (options
    sorted), the one spelling every table, plot and JSON file uses for that configuration.

    Raises ``ValueError`` naming the spec for an unknown selector or option, or a malformed spec.
    """
    from .text import format_selector_spec, parse_selector_spec

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"selector spec must be a non-empty string like 'cab:keep=highest', got {spec!r}")
    text = spec.strip()
    label = None
    if "@" in text:
        label, text = (s.strip() for s in text.split("@", 1))
        if not label:
            raise ValueError(f"selector spec {spec!r}: empty label before '@'")
    try:
        name, opts = parse_selector_spec(text)
    except ValueError as e:
        raise ValueError(f"selector spec {spec!r}: {e}") from None
    return Config(label or format_selector_spec(name, opts), name, opts)
