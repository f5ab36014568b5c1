"""The ``cab`` command line: ``cab demo``, ``cab eval bridge|passkey|recall|ppl``, ``cab bench predictor|attention``.

Each subcommand lives in its own module with a ``main(argv) -> int``; this file only dispatches.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": "cab_attention.demo",
    "eval bridge": "cab_attention.evaluate.bridge",
    "eval passkey": "cab_attention.evaluate.passkey",
    "eval recall": "cab_attention.evaluate.recall",
    "eval ppl": "cab_attention.evaluate.ppl",
    "bench predictor": "cab_attention.benchmark.predictor",
    "bench attention": "cab_attention.benchmark.attention",
}

USAGE = "usage: cab {demo | eval bridge|passkey|recall|ppl | bench predictor|attention} [options]  (add --help)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    for n in (2, 1):
        key = " ".join(argv[:n])
        if key in COMMANDS:
            module = importlib.import_module(COMMANDS[key])
            return int(module.main(argv[n:]) or 0)
    print(f"cab: unknown command {' '.join(argv[:2])!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
