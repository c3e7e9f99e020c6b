"""Hand-written GPU kernels (Pallas, Triton backend; flash attention also for the Mosaic GPU
backend, opt-in) for the model's hot spots.

Each kernel has a plain-JAX definition elsewhere in `model/` that it is tested
against; configs choose a kernel explicitly (`ModelConfig.norm_impl`,
`ModelConfig.activation_impl`, `ModelConfig.cross_entropy_impl`,
`ModelConfig.decode_attention`, `ModelConfig.decode_matmul`,
`ModelConfig.attention_backend="pallas"`) or through "auto", the default of all six,
which picks the kernels on a GPU where they are correct and measured faster
(`model/auto.py`). Off the GPU the kernels run in Pallas' interpreter, which is slow
but lets the CPU tests check them.
"""
