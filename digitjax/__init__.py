"""digitjax: a fast JAX/Flax handwritten-digit training toolkit."""

__version__ = "0.1.0"
