"""Model building blocks. Tensor-parallel layers hold every collective the model runs."""
