"""Distillation, recovery training and quantization-aware training: `distill`, `qat`, `train`, `trainable`."""
