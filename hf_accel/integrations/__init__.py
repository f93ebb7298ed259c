"""Integrations with other libraries: artifacts save/load, pipeline, quantization."""
