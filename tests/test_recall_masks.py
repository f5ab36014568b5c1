"""The recall harness runs a sliding-window model with its real masks (tiny random Gemma-3): the recording
attention function leaves the logits unchanged, and only the plain-causal (full-attention) layers are
measured."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cab_eval.evaluate import recall  # noqa: E402


def _tiny_gemma3(window: int):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=window, max_position_embeddings=512,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    model.set_attn_implementation("sdpa")
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_recorder_keeps_sliding_windows_and_measures_only_full_layers():
    model = _tiny_gemma3(window=16)
    ids = torch.randint(0, 97, (1, 96), generator=torch.Generator().manual_seed(1))
    want = _logits(model, ids)
    rec = recall.Recorder([recall.parse_spec("vertical_slash"), recall.parse_spec("oracle")], [0.5], block_size=16)
    recall.register(rec)
    model.set_attn_implementation(recall.ATTN_NAME)
    try:
        got = _logits(model, ids)
    finally:
        model.set_attn_implementation("sdpa")
    # The sliding layers saw their window: the same logits as the model's own SDPA path.
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert {r["layer"] for r in rec.rows} == {2}
    assert rec.skipped == {0, 1}
    # A window that covers the whole text is plain causal: every layer is measured.
    rec2 = recall.Recorder([recall.parse_spec("oracle")], [0.5], block_size=16)
    recall.record(_tiny_gemma3(window=512), ids, rec2)
    assert {r["layer"] for r in rec2.rows} == {0, 1, 2} and not rec2.skipped


def test_a_sliding_layer_asked_for_is_measured_against_its_window():
    model = _tiny_gemma3(window=40)
    ids = torch.randint(0, 97, (1, 128), generator=torch.Generator().manual_seed(2))
    # Keeping every block of the window is the whole windowed softmax: recall 1 and no error. Measured
    # against the full causal softmax instead, recall would be well below 1.
    rec = recall.Recorder([recall.parse_spec("dense"), recall.parse_spec("oracle")], [0.5], block_size=16,
                          layers=[1, 2])
    recall.record(model, ids, rec)
    assert {r["layer"] for r in rec.rows} == {1, 2} and rec.windowed == {1: 40}
    dense = [r for r in rec.rows if r["method"] == "dense" and r["layer"] == 1][0]
    assert dense["recall"] == pytest.approx(1.0, abs=1e-6) and dense["rel_err"] < 1e-5
    oracle = [r for r in rec.rows if r["method"] == "oracle" and r["layer"] == 1][0]
    assert oracle["kept_blocks"] == oracle["budget_blocks"] and oracle["recall"] < 1.0


@pytest.mark.parametrize("spec", ["flexprefill:allocation=head", "vertical_slash:allocation=layer",
                                  "magnitude:allocation=layer,share_kv=true"])
def test_allocated_masks_equal_select_blocks_at_each_sparsity(spec):
    import cab_attention as cab

    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 160, 16, generator=gen), torch.randn(1, 2, 160, 16, generator=gen)
    cfg = recall.parse_spec(spec)
    sparsities = [0.5, 0.8]
    for s, info in zip(sparsities, recall.config_masks(q, k, cfg, sparsities, 16, None)):
        assert info["kept"] == info["budget"]
        want = cab.select_blocks(q, k, selector=cfg.selector, sparsity=s, block_size=16, **cfg.options)
        assert torch.equal(info["mask"], want.query_head_mask()[0])


def test_is_plain_causal():
    n = 8
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    assert recall.is_plain_causal(None, n)
    assert recall.is_plain_causal(causal[None, None], n)
    window = causal & ~torch.ones(n, n, dtype=torch.bool).tril(-4)
    assert not recall.is_plain_causal(window[None, None], n)
    assert recall.is_plain_causal(window[None, None], n, window=4)
    assert not recall.is_plain_causal(window[None, None], n, window=5)
    additive = torch.zeros(n, n).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert recall.is_plain_causal(additive[None, None], n)
