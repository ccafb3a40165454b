"""Triton kernels. Importing this package needs triton; ``triton_lstm.ops`` guards that import."""
