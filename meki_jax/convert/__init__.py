"""Checkpoint converters between meki-jax and other formats."""
