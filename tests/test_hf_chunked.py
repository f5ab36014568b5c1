"""Chunked prefill into a KV cache (cab_attention.hf.prefill), on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from cab_attention import hf  # noqa: E402

BS = 16


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 203), generator=torch.Generator().manual_seed(0))


def test_sparsity0_equals_one_shot_prefill(ids):
    m = tiny_llama()
    with torch.no_grad():
        full = m(input_ids=ids).logits[:, -1]
    hf.enable(m, selector="cab", sparsity=0.0, block_size=BS)
    cache, last = hf.prefill(m, ids, chunk_size=4 * BS)
    torch.testing.assert_close(last, full, atol=1e-5, rtol=0)
    assert cache.get_seq_length() == ids.shape[1]
    # a second call extends the same cache (a prompt that arrives in pieces)
    more = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    cache, last2 = hf.prefill(m, more, chunk_size=2 * BS, cache=cache)
    hf.disable(m)
    with torch.no_grad():
        full2 = m(input_ids=torch.cat([ids, more], 1)).logits[:, -1]
    torch.testing.assert_close(last2, full2, atol=1e-5, rtol=0)


def test_attention_never_sees_more_than_a_chunk(ids):
    m = tiny_llama()
    hf.enable(m, selector="cab", sparsity=0.5, block_size=BS)
    with hf.record(m) as log:
        hf.prefill(m, ids, chunk_size=3 * BS)
    q_lens = [c.q_len for c in log.calls]
    kv_lens = [c.kv_len for c in log.calls]
    assert max(q_lens) == 3 * BS and sum(q_lens) == 2 * ids.shape[1]  # two layers
    assert kv_lens[-1] == ids.shape[1]  # the last chunk selected over every cached key
    assert log.density is not None and log.density < 1


def test_generate_continues_from_the_cache(ids):
    m = tiny_llama()
    prompt = ids[:1]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    hf.enable(m, selector="cab", sparsity=0.0, block_size=BS)
    with torch.no_grad():
        one_shot = m.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
        cache, _ = hf.prefill(m, prompt[:, :-1], chunk_size=4 * BS)
        chunked = m.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache, **kw)
    assert torch.equal(chunked, one_shot)


@pytest.mark.parametrize("chunk", [0, 24, 100, 16.0, True])
def test_chunk_size_must_be_a_block_multiple(ids, chunk):
    m = tiny_llama()
    hf.enable(m, selector="cab", sparsity=0.5, block_size=BS)
    with pytest.raises(ValueError, match="chunk_size must be a positive multiple"):
        hf.prefill(m, ids, chunk_size=chunk)


def test_bad_inputs_raise(ids):
    m = tiny_llama()
    with pytest.raises(ValueError, match="enable"):
        hf.prefill(m, ids)
    hf.enable(m, selector="cab", sparsity=0.5, block_size=BS)
    with pytest.raises(ValueError, match="input_ids"):
        hf.prefill(m, ids[0])
    assert isinstance(hf.prefill(m, ids[:, :20], chunk_size=BS)[0], DynamicCache)
