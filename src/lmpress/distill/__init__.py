"""Distillation, recovery training and quantization-aware training: `kd`, `qat`, `train`, `trainable`."""
