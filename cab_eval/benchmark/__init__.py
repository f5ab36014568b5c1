"""GPU timings of the predictor and the attention (``cab bench predictor|attention|summary``)."""
