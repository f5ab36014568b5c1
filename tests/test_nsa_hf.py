"""The NSA drop-in layer in a tiny random Llama: wiring (projections, RoPE, reshape) and training steps."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import cab_attention as cab  # noqa: E402
from cab_attention.nsa_hf import NSALlamaAttention, replace_attention  # noqa: E402


def _tiny(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(cfg).eval()


class _DenseStub(torch.nn.Module):
    """Stands in for NSAAttention: plain causal attention on the q, k, v it is handed."""

    def forward(self, q, k, v, gate_input=None):
        return cab.dense_attention(q, k, v)


def test_layer_wiring_matches_original_attention():
    """With dense attention in place of NSA the swapped model must give the original logits, which
    checks the projections, the rotary embeddings and the output reshape of the wrapper."""
    model = _tiny()
    ids = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
    replace_attention(model, block_size=8, num_selected=2, window=8, backend="reference")
    for layer in model.model.layers:
        assert isinstance(layer.self_attn, NSALlamaAttention)
        layer.self_attn.nsa = _DenseStub()
    with torch.no_grad():
        got = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("selection", ["nsa", "cab"])
def test_training_step_reaches_every_nsa_parameter(selection):
    model = replace_attention(_tiny(), block_size=8, num_selected=2, window=8, selection=selection, backend="reference")
    model.train()
    ids = torch.randint(0, 64, (2, 37))
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    for name, p in model.named_parameters():
        if ".nsa." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_cache_and_padding_are_refused():
    model = replace_attention(_tiny(), block_size=8, num_selected=2, window=8, backend="reference")
    ids = torch.randint(0, 64, (1, 20))
    with pytest.raises(ValueError, match="use_cache=False"):
        model(ids, use_cache=True)
    mask = torch.ones(1, 20, dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="plain causal"):
        model(ids, attention_mask=mask, use_cache=False)
    with pytest.raises(ValueError, match="model.model.layers"):
        replace_attention(torch.nn.Linear(2, 2))
