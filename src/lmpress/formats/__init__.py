"""Storage math, the lowest floor: how compressed weights are laid out as numbers and bytes.

`grid` (integer codes with per-group scales and zero points), `packing` (dense bit packing of
codes), `ggml` and `ggml_bytes` (llama.cpp's GGML block types and their exact bytes) and
`gguf_file` (the GGUF container). Nothing here chooses a grid for a weight matrix (that is a
method, in `lmpress.quant`) or knows a layer or a model; it imports only `lmpress.errors`.
"""
