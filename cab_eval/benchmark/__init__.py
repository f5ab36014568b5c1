"""Stage 7, benchmark: GPU timings of the predictor and the attention (``cab bench ...``)."""
