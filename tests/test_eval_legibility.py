"""Tables and plots say when two methods' values coincide (one line would hide the other)."""

from __future__ import annotations

from cab_eval.evaluate.recall import same_values
from cab_eval.plotting import coincidences, legend_label, line_style


def test_coincidences_name_each_pair_once_on_the_later_method():
    vals = {"oracle": [0.9, 0.8], "cab": [0.7, 0.6], "streaming": [0.7, 0.6], "random": [0.5, 0.4],
            "magnitude": [0.7, 0.61]}
    same = coincidences(vals)
    assert same == {"streaming": ["cab"]}
    assert legend_label("streaming", same) == "streaming  (= cab)" and legend_label("cab", same) == "cab"
    assert coincidences({"a": [1.0], "b": [1.0 + 1e-12], "c": [1.0]}) == {"b": ["a"], "c": ["a", "b"]}
    assert coincidences({"a": [], "b": []}) == {}


def test_neighbouring_lines_differ_in_marker_and_style():
    styles = [line_style(i) for i in range(8)]
    for a, b in zip(styles, styles[1:]):
        assert a["marker"] != b["marker"] and a["ls"] != b["ls"]


def test_recall_summary_marks_methods_with_the_same_values():
    def row(m, s, rec, err):
        return {"method": m, "sparsity": s, "recall": rec, "rel_err": err}

    summary = [row("cab", 0.8, 0.7, 0.3), row("streaming", 0.8, 0.7, 0.3), row("cab", 0.9, 0.6, 0.4),
               row("streaming", 0.9, 0.6, 0.4), row("magnitude", 0.8, 0.7, 0.3), row("magnitude", 0.9, 0.5, 0.4)]
    assert same_values(summary) == {"streaming": ["cab"]}
