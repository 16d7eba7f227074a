"""Tensor-parallel process-group state for one engine."""
