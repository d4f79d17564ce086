"""Staged teacher-guided distillation: losses, data pipeline, train loop (`python -m hylo_jax.distill`)."""
