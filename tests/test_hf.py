"""The transformers integration (cab_attention.hf).

Mechanics run on tiny randomly initialised Llama (GQA) and Mistral (sliding window) models built from
transformers' own classes (milliseconds each); the real SmolLM2 tests are marked ``model``.
"""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM  # noqa: E402

from cab_attention import hf  # noqa: E402

BS = 32


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


def tiny_mistral(window: int = 48) -> MistralForCausalLM:
    torch.manual_seed(1)
    cfg = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                        max_position_embeddings=1024)
    return MistralForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 200), generator=torch.Generator().manual_seed(0))


def logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def test_sparsity0_equals_default_and_disable_restores(ids):
    m = tiny_llama()
    ref = logits(m, ids)
    assert hf.enable(m, selector="cab", sparsity=0.0, block_size=BS) is m
    assert m.config._attn_implementation == hf.ATTN_NAME
    torch.testing.assert_close(logits(m, ids), ref, atol=1e-5, rtol=0)
    hf.disable(m)
    assert m.config._attn_implementation == "sdpa"
    assert hf.settings_of(m) is None
    torch.testing.assert_close(logits(m, ids), ref, atol=0, rtol=0)


def _manual_attention(q, k, v, token_mask, scale):
    """Independent float64 masked softmax attention (GQA by repeating heads)."""
    g = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(g, 1)
    v = v.double().repeat_interleave(g, 1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~token_mask, float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("backend", ["auto", "reference", "sdpa"])
def test_sparse_layer_matches_independent_reference(ids, backend):
    m = tiny_llama()
    hf.enable(m, selector="magnitude", sparsity=0.6, block_size=BS, backend=backend)
    with hf.record(m, capture=[1]) as rec:
        out = logits(m, ids)
    assert len(rec.calls) == 2 and all(c.path == "sparse" for c in rec.calls)
    assert 0 < rec.density < 1
    assert set(rec.per_layer()) == {0, 1}
    cap = rec.captured[1][0]
    sel = cap["selection"]
    assert rec.calls[1].kept_blocks / rec.calls[1].valid_blocks == pytest.approx(sel.density)
    attn = m.model.layers[1].self_attn
    got, weights = hf.cab_attention_forward(attn, cap["q"], cap["k"], cap["v"], None, scaling=attn.scaling)
    assert weights is None and got.is_contiguous()
    assert got.shape == (2, 200, 4, 16)  # (B, L, Hq, D)
    want = _manual_attention(cap["q"], cap["k"], cap["v"], sel.token_mask(), attn.scaling)
    torch.testing.assert_close(got.double(), want.transpose(1, 2), atol=1e-5, rtol=0)
    # the sparsity is real: the model's output moved away from dense
    hf.disable(m)
    assert (out - logits(m, ids)).abs().max() > 1e-3


def test_scaling_is_passed_through(ids):
    m = tiny_llama()
    hf.enable(m, selector="streaming", sparsity=0.5, block_size=BS)
    attn = m.model.layers[0].self_attn
    with hf.record(m, capture=[0]) as rec:
        logits(m, ids[:1])
    cap = rec.captured[0][0]
    a, _ = hf.cab_attention_forward(attn, cap["q"], cap["k"], cap["v"], None, scaling=0.05)
    want = _manual_attention(cap["q"], cap["k"], cap["v"], cap["selection"].token_mask(), 0.05)
    torch.testing.assert_close(a.double(), want.transpose(1, 2), atol=1e-5, rtol=0)


def test_chunked_prefill_and_decode(ids):
    from transformers import DynamicCache

    m = tiny_llama()
    full = logits(m, ids)
    hf.enable(m, selector="cab", sparsity=0.0, block_size=BS)
    cache = DynamicCache(config=m.config)
    with hf.record(m) as rec:
        a = logits(m, ids[:, :120], past_key_values=cache)
        b = logits(m, ids[:, 120:199], past_key_values=cache)  # a chunk after the cache
        c = logits(m, ids[:, 199:], past_key_values=cache)  # one decode step
    torch.testing.assert_close(torch.cat([a, b, c], 1), full, atol=1e-5, rtol=0)
    paths = [(x.q_len, x.kv_len, x.path) for x in rec.calls]
    assert paths[2:4] == [(79, 199, "sparse")] * 2
    assert paths[4:] == [(1, 200, "dense")] * 2
    # at s > 0 the chunk runs block-sparse against the cache
    hf.enable(m, selector="cab", sparsity=0.7, block_size=BS)
    cache = DynamicCache(config=m.config)
    with hf.record(m) as rec:
        logits(m, ids[:, :120], past_key_values=cache)
        logits(m, ids[:, 120:], past_key_values=cache)
    assert [x.path for x in rec.calls] == ["sparse"] * 4
    assert rec.calls[-1].density < 1


def test_generate_with_cab_and_after_disable():
    m = tiny_llama()
    prompt = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(3))
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        base = m.generate(prompt, **kw)
        hf.enable(m, selector="cab", sparsity=0.5, block_size=BS)
        with hf.record(m) as rec:
            sparse = m.generate(prompt, **kw)
        hf.enable(m, selector="cab", sparsity=0.0, block_size=BS)
        dense = m.generate(prompt, **kw)
        hf.disable(m)
        after = m.generate(prompt, **kw)
    assert sparse.shape == (1, 105)
    assert rec.calls[0].path == "sparse" and rec.calls[-1].path == "dense" and rec.calls[-1].q_len == 1
    assert torch.equal(dense, base) and torch.equal(after, base)


@pytest.mark.parametrize("sparsity", [0.0, 0.6])
def test_padded_batch_rows_equal_unpadded_runs(sparsity):
    m = tiny_llama()
    g = torch.Generator().manual_seed(5)
    a = torch.randint(1, 128, (1, 150), generator=g)
    b = torch.randint(1, 128, (1, 110), generator=g)
    hf.enable(m, selector="magnitude", sparsity=sparsity, block_size=BS)
    alone_a, alone_b = logits(m, a), logits(m, b)
    for side in ("left", "right"):
        pad = torch.zeros(1, 40, dtype=torch.long)
        rows_b = torch.cat([pad, b], 1) if side == "left" else torch.cat([b, pad], 1)
        batch = torch.cat([a, rows_b])
        mask = torch.ones_like(batch)
        real = slice(40, 150) if side == "left" else slice(0, 110)
        mask[1] = 0
        mask[1, real] = 1
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        with hf.record(m) as rec:
            out = logits(m, batch, attention_mask=mask, position_ids=pos)
        torch.testing.assert_close(out[0], alone_a[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[1, real], alone_b[0], atol=1e-5, rtol=0)
        assert {c.path for c in rec.calls} == {"masked"}


def test_sliding_window_is_kept(ids):
    m = tiny_mistral(window=48)
    ref = logits(m, ids)
    hf.enable(m, selector="magnitude", sparsity=0.0, block_size=BS, sliding="sparse")
    with hf.record(m, capture=[0]) as rec:
        torch.testing.assert_close(logits(m, ids), ref, atol=1e-5, rtol=0)
    # Sliding layers (every Mistral layer) are dense by default: the model's own logits at any sparsity.
    hf.enable(m, selector="magnitude", sparsity=0.5, block_size=BS)
    with hf.record(m) as rec:
        torch.testing.assert_close(logits(m, ids), ref, atol=1e-5, rtol=0)
    assert {c.path for c in rec.calls} == {"sliding-dense"} and rec.density is None
    hf.enable(m, selector="magnitude", sparsity=0.5, block_size=BS, sliding="sparse")
    with hf.record(m, capture=[0]) as rec:
        logits(m, ids)
    assert {c.path for c in rec.calls} == {"sparse"} and {c.window for c in rec.calls} == {48}
    cap = rec.captured[0][0]
    attn = m.model.layers[0].self_attn
    from transformers.masking_utils import sliding_window_causal_mask_function

    # Rebuild the window mask independently and check the layer against a manual reference.
    n = ids.shape[1]
    qi, ki = torch.arange(n)[:, None], torch.arange(n)[None, :]
    window = (ki <= qi) & (qi - ki < 48)
    assert torch.equal(sliding_window_causal_mask_function(48)(0, 0, qi, ki).expand(n, n), window)
    got, _ = hf.cab_attention_forward(attn, cap["q"], cap["k"], cap["v"], window[None, None].expand(2, 1, n, n),
                                      scaling=attn.scaling, sliding_window=48)
    sel = cap["selection"]
    blocks = sel.query_head_mask()
    t = torch.arange(n)
    for row in range(ids.shape[0]):
        tok = blocks[row][:, t // BS][:, :, t // BS] & window
        want = _manual_attention(cap["q"][row : row + 1], cap["k"][row : row + 1], cap["v"][row : row + 1], tok,
                                 attn.scaling)
        torch.testing.assert_close(got[row].double(), want[0].transpose(0, 1), atol=1e-5, rtol=0)


def test_two_models_keep_their_own_settings(ids):
    m1, m2 = tiny_llama(0), tiny_llama(1)
    hf.enable(m1, selector="cab", sparsity=0.5, block_size=BS)
    hf.enable(m2, selector="streaming", sparsity=0.8, block_size=BS, backend="reference")
    with hf.record(m1) as r1, hf.record(m2) as r2:
        logits(m1, ids)
        logits(m2, ids)
    assert hf.settings_of(m1).selector == "cab" and hf.settings_of(m2).selector == "streaming"
    assert r1.density > r2.density  # 50% vs 80% sparsity at the same grid
    assert len(r1.calls) == len(r2.calls) == 2
    # re-enabling replaces settings but disable still restores the original implementation
    hf.enable(m1, selector="random", sparsity=0.3, block_size=BS, seed=3)
    assert hf.settings_of(m1).options == {"seed": 3}
    hf.disable(m1)
    assert m1.config._attn_implementation == "sdpa"


def test_short_prompt_is_dense_and_density_none():
    m = tiny_llama()
    hf.enable(m, selector="cab", sparsity=0.9, block_size=64)
    x = torch.randint(0, 128, (1, 40))
    with hf.record(m) as rec:
        out = logits(m, x)
    assert rec.density is None and {c.path for c in rec.calls} == {"dense"}
    hf.disable(m)
    torch.testing.assert_close(out, logits(m, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"selector": "nope"}, "selector"),
        ({"block_size": 48}, "block_size"),
        ({"backend": "cuda"}, "backend"),
        ({"lam": -1.0}, "lam"),
        ({"bogus": 1}, "bogus"),
        ({"scale": 0.1}, "scale"),
        ({"selector": "magnitude", "keep": "lowest"}, "keep"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    m = tiny_llama()
    with pytest.raises(ValueError, match=match):
        hf.enable(m, **kwargs)
    assert m.config._attn_implementation == "sdpa"


def test_misuse_raises():
    m = tiny_llama()
    with pytest.raises(ValueError, match="model"):
        hf.enable(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not enabled"):
        hf.disable(m)
    with pytest.raises(ValueError, match="enable"):
        with hf.record(m):
            pass
    hf.enable(m, sparsity=0.5, block_size=BS)
    with pytest.raises(ValueError, match="capture"):
        with hf.record(m, capture=["x"]):
            pass
    attn = m.model.layers[0].self_attn
    q, k = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16)
    with pytest.raises(ValueError, match="dropout"):
        hf.cab_attention_forward(attn, q, k, k, None, dropout=0.1)
    with pytest.raises(ValueError, match="softcap"):
        hf.cab_attention_forward(attn, q, k, k, None, softcap=30.0)
    with pytest.raises(ValueError, match="sliding_window"):
        hf.cab_attention_forward(attn, q, k, k, None, sliding_window=16)
    with pytest.raises(ValueError, match="bias"):
        hf.cab_attention_forward(attn, q, k, k, torch.full((1, 1, 64, 64), 0.5))
    gap = torch.ones(1, 1, 64, 64, dtype=torch.bool).tril()
    gap[..., 10] = False
    with pytest.raises(ValueError, match="contiguous"):
        hf.cab_attention_forward(attn, q, k, k, gap)
    with pytest.raises(ValueError, match="CAB settings"):
        hf.cab_attention_forward(torch.nn.Module(), q, k, k, None)


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="path_or_gguf"):
        hf.load_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="path_or_gguf"):
        hf.load_model(tmp_path)  # a folder without config.json
    with pytest.raises(ValueError, match="gguf_path"):
        hf.load_smollm2(gguf_path=tmp_path / "none.gguf")
    monkeypatch.setenv("CAB_SMOLLM2_GGUF", str(tmp_path / "none.gguf"))
    with pytest.raises(ValueError, match="CAB_SMOLLM2_GGUF"):
        hf.load_smollm2()
    with pytest.raises(ValueError, match="dtype"):
        hf.load_model(tmp_path, dtype="float8")


def test_model_dir_env_and_cache_location(tmp_path, monkeypatch):
    monkeypatch.delenv("CAB_SMOLLM2_GGUF", raising=False)
    monkeypatch.setenv("CAB_MODEL_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="CAB_MODEL_DIR"):
        hf.find_smollm2_gguf()
    gguf = tmp_path / hf.SMOLLM2_GGUF_NAME
    gguf.write_bytes(b"GGUF")
    assert hf.find_smollm2_gguf() == gguf
    monkeypatch.setenv("CAB_CACHE_DIR", str(tmp_path / "cache"))
    assert hf.cache_root() == tmp_path / "cache"


def test_non_finite_inputs_in_a_model_layer():
    m = tiny_llama()
    attn = m.model.layers[0].self_attn
    q, k, v = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    v[0, 1, 5, 2] = float("nan")
    for sparsity in (0.5, 0.0):  # the block-sparse path and the keep-everything (dense) path
        hf.enable(m, selector="magnitude", sparsity=sparsity, block_size=BS)
        with pytest.raises(ValueError, match="^v holds NaN or inf"):
            hf.cab_attention_forward(attn, q, k, v, None, scaling=attn.scaling)
    hf.enable(m, selector="magnitude", sparsity=0.5, block_size=BS, check_finite=False)
    out, _ = hf.cab_attention_forward(attn, q, k, v, None, scaling=attn.scaling)
    assert out.isnan().any()
    with pytest.raises(ValueError, match="check_finite"):
        hf.enable(m, check_finite="no")


def test_recorder_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="AttentionCallLog"):
        assert hf.Recorder is hf.AttentionCallLog
    m = tiny_llama()
    hf.enable(m, sparsity=0.5, block_size=BS)
    with hf.record(m) as log:
        pass
    assert isinstance(log, hf.AttentionCallLog)


# ----------------------------------------------------------------------------------------------------
# The real model
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2():
    model, tok = hf.load_smollm2()
    return model, tok


@pytest.mark.model
def test_smollm2_loads_from_cache_quickly(smollm2):
    import time

    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    t0 = time.perf_counter()
    hf.load_smollm2()
    assert time.perf_counter() - t0 < 5.0  # cached safetensors (~0.2 s here; generous for a loaded CI box)


@pytest.mark.model
def test_smollm2_sparsity0_logits_and_dense_passkey_at_1k(smollm2):
    """At sparsity 0 the logits equal default attention (fp32, 1e-4), and the dense model retrieves the
    pass key from a ~1k-token Landmark prompt."""
    from cab_eval.evaluate.passkey_decode import generate_answers
    from cab_eval.evaluate.text import passkey_prompt

    model, tok = smollm2
    p = passkey_prompt(tok, 27181, 1024, 0.4, align=64)
    ids = torch.tensor([p.ids])
    assert 960 <= ids.shape[1] <= 1024
    ref = logits(model, ids, logits_to_keep=64)
    hf.enable(model, selector="cab", sparsity=0.0)
    try:
        with hf.record(model) as rec:
            got = logits(model, ids, logits_to_keep=64)
        assert len(rec.calls) == model.config.num_hidden_layers and rec.density == 1.0
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
        text = generate_answers(model, tok, ids, 8)[0]
    finally:
        hf.disable(model)
    assert "27181" in text


@pytest.mark.model
def test_smollm2_generate_sparse_then_disabled(smollm2):
    model, tok = smollm2
    ids = torch.tensor([tok("The capital of France is Paris. " * 12 + "The capital of France is",
                            add_special_tokens=False).input_ids])
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        base = model.generate(ids, **kw)
        hf.enable(model, selector="cab", sparsity=0.5, block_size=32)
        try:
            with hf.record(model) as rec:
                out = model.generate(ids, **kw)
        finally:
            hf.disable(model)
        after = model.generate(ids, **kw)
    assert out.shape[1] == ids.shape[1] + 4
    assert math.isclose(rec.density, rec.kept_blocks / rec.valid_blocks) and rec.density < 1
    assert torch.equal(after, base)
