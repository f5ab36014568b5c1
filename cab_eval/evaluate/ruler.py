"""RULER-style retrieval tasks, generated locally at exact token lengths, and their scoring: one import
for the suite's public names, which live in modules of one job each:

* :mod:`ruler_tasks`: the six tasks (NIAH single / multi-key / multi-value, variable tracking, CWE, FWE),
  their specs and option checks, :class:`RulerBuilder` and the grid of prompts (:func:`build_prompts`).
* :mod:`ruler_haystack`: the corpus, its sentences and words, and the token-level :class:`Haystack`.
* :mod:`ruler_scoring`: :func:`score_output`, :func:`aggregate` with Wilson intervals, :func:`paired_accuracy`.
* :mod:`ruler_token_ids`: the token-id file (:func:`save_prompts`, :func:`load_prompts`) and the
  tokenizer check sentence.

No model, no matplotlib here: the runner is :mod:`ruler_run`, its trials file :mod:`ruler_trials`, its
reports :mod:`ruler_report`.
"""

from __future__ import annotations

from .ruler_haystack import (HAYSTACKS, NOISE_SENTENCES, Haystack, corpus_sentences, corpus_texts, corpus_words,
                             encode, encode_many)
from .ruler_scoring import aggregate, answer_found, paired_accuracy, score_output, wilson
from .ruler_tasks import (CWE_ASK, CWE_HEAD, DEPTH_TASKS, FWE_ASK, FWE_HEAD, FWE_NOISE, NIAH_ASK_ALL, NIAH_ASK_ONE,
                          NIAH_HEAD, NIAH_NEEDLE, NIAH_VALUE_RANGE, TASK_OPTIONS, TASKS, VT_ASK, VT_HEAD, VT_HOP,
                          VT_ROOT, VT_VALUE_RANGE, RulerBuilder, RulerPrompt, TaskSpec, build_prompts,
                          cwe_frequencies, parse_task_spec, zeta, zipf_counts)
from .ruler_token_ids import CHECK_SENTENCE, check_sentence_record, load_prompts, save_prompts
from .text import BOS_FAMILIES, coerce_value, decide_bos, model_bos  # the one BOS rule and value parser

__all__ = [
    # tasks and the grid
    "TASKS", "TASK_OPTIONS", "DEPTH_TASKS", "TaskSpec", "parse_task_spec", "RulerPrompt", "RulerBuilder",
    "build_prompts", "cwe_frequencies", "zeta", "zipf_counts",
    "NIAH_HEAD", "NIAH_NEEDLE", "NIAH_ASK_ONE", "NIAH_ASK_ALL", "VT_HEAD", "VT_ROOT", "VT_HOP", "VT_ASK",
    "CWE_HEAD", "CWE_ASK", "FWE_HEAD", "FWE_ASK", "FWE_NOISE", "NIAH_VALUE_RANGE", "VT_VALUE_RANGE",
    # haystack and tokenizer pieces
    "HAYSTACKS", "NOISE_SENTENCES", "Haystack", "corpus_texts", "corpus_sentences", "corpus_words",
    "encode", "encode_many",
    # scoring and statistics
    "answer_found", "score_output", "wilson", "aggregate", "paired_accuracy",
    # the token-id file
    "CHECK_SENTENCE", "check_sentence_record", "save_prompts", "load_prompts",
    # BOS and values (from text)
    "BOS_FAMILIES", "coerce_value", "decide_bos", "model_bos",
]
