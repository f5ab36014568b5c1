"""cab-eval: the measurements of cab-attention (``pip install cab-attention[eval]``).

:mod:`.cli` is the ``cab`` command; :mod:`.demo` the real-model demo; :mod:`.evaluate` the accuracy
evaluations (bridge, passkey, recall, perplexity); :mod:`.benchmark` the GPU timings. The core
library, :mod:`cab_attention`, never imports this package.
"""
