"""Pruning: unstructured and N:M (magnitude, Wanda, SparseGPT), structured heads / neurons / blocks."""
