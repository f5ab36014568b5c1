"""Stage 6, evaluate: does a selector keep what attention needs? (bridge, passkey, recall, ppl)."""
