"""Accuracy evaluations: does a selector keep what attention needs? (``cab eval bridge|passkey|recall|ppl``)."""
