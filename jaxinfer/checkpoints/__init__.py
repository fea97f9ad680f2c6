"""Checkpoint readers: each returns (ModelConfig, Params) fully checked, or raises before building anything."""
