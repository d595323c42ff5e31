"""tinyllama_jax: pretrain Llama-2-shaped models (TinyLlama-1.1B) in JAX/Flax NNX.

Importing the package loads nothing heavy: no kernels, no torch, no grain.
"""

__version__ = "0.4.0"
