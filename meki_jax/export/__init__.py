"""Export for inference: folded tables (memory_store), backbone (backbone), the JAX exporter
(exporter) and the PyTorch side (torch_model, to_device). Nothing is imported here, so the
PyTorch side loads without jax."""
