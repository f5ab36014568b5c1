"""The ``cab`` command: ``cab demo``, ``cab eval <command>``, ``cab bench <command>``, ``cab train <command>``.

Each command lives in its own module with a ``main(argv) -> int``; this file only lists and dispatches
them. ``cab --help`` and ``cab <group> --help`` list the commands with one line each; a command's own
options come from ``cab <command> --help``. An unknown command exits with status 2 and the list.
Every command writes under ``runs/`` unless ``--out`` (or ``--out-dir``/``--csv``) says otherwise.
"""

from __future__ import annotations

import importlib
import sys

# group -> command -> (module, one-line description)
COMMANDS: dict[str, dict[str, tuple[str, str]]] = {
    "": {
        "demo": ("cab_eval.demo", "passkey retrieval and one layer's masks on SmolLM2 (CPU, about 2 minutes)"),
    },
    "eval": {
        "bridge": ("cab_eval.evaluate.bridge", "the N=100 two-community bridge graph: token level, block level, noise sweep"),
        "passkey": ("cab_eval.evaluate.passkey", "Landmark passkey retrieval per selector and sparsity on a real model"),
        "recall": ("cab_eval.evaluate.recall", "attention mass each selector keeps per layer; --ablation runs the pre-registered set"),
        "ppl": ("cab_eval.evaluate.ppl", "perplexity per selector and sparsity (and speed on CUDA)"),
        "ruler": ("cab_eval.evaluate.ruler_run", "RULER-style retrieval suite (NIAH, multi-key/value, variable tracking, CWE/FWE)"),
    },
    "bench": {
        "predictor": ("cab_eval.benchmark.predictor", "GPU timings of choosing the blocks (coarsen, score, select, mask)"),
        "attention": ("cab_eval.benchmark.attention", "GPU timings of dense baselines against block-sparse attention, end to end"),
        "model": ("cab_eval.benchmark.model", "time to first token of a Llama-3-8B-shaped decoder, dense against hf.enable"),
        "nsa": ("cab_eval.benchmark.nsa", "forward+backward of NSA attention (nsa, cab, antidiagonal selection) against dense SDPA (cuDNN, flash)"),
        "varlen": ("cab_eval.benchmark.varlen", "packed variable-length batches against dense varlen and padding"),
        "distributed": ("cab_eval.benchmark.distributed", "context-parallel prefill (torchrun): all-to-all against attention time"),
        "summary": ("cab_eval.benchmark.summary", "the benchmarks page (markdown and plots) from a results CSV"),
    },
    "train": {
        "nsa": ("cab_eval.train_nsa", "a tiny LM with dense or NSA attention (NSA's own, cab or antidiagonal selection)"),
    },
}
GROUP_HELP = {"eval": "accuracy evaluations", "bench": "GPU benchmarks", "train": "training comparisons"}


def usage(group: str | None = None) -> str:
    """The command list: every command with its line (``group``: that group's only)."""
    lines = []
    if group is None:
        lines.append("usage: cab <command> [options]    (cab <command> --help for its options)\n\ncommands:")
        groups = list(COMMANDS)
    else:
        lines.append(f"usage: cab {group} <command> [options]    ({GROUP_HELP[group]}; cab {group} <command> --help)\n\n"
                     "commands:")
        groups = [group]
    for g in groups:
        for name, (_, desc) in COMMANDS[g].items():
            full = f"{g} {name}".strip()
            lines.append(f"  {full:18s} {desc}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    first = argv[0]
    if first in COMMANDS[""]:
        return _run(COMMANDS[""][first][0], argv[1:])
    if first in COMMANDS and first != "":
        rest = argv[1:]
        if not rest or rest[0] in ("-h", "--help", "help"):
            print(usage(first), file=sys.stdout if rest else sys.stderr)
            return 0 if rest else 2
        if rest[0] in COMMANDS[first]:
            return _run(COMMANDS[first][rest[0]][0], rest[1:])
        print(f"cab {first}: unknown command {rest[0]!r}\n\n{usage(first)}", file=sys.stderr)
        return 2
    print(f"cab: unknown command {first!r}\n\n{usage()}", file=sys.stderr)
    return 2


def _run(module: str, argv: list[str]) -> int:
    return int(importlib.import_module(module).main(argv) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
