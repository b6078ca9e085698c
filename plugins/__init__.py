"""Kernels, one module per op: torch reference + Triton kernel + torch.library op (+ TensorRT plugin)."""
