"""Triton Inference Server model repositories: generation, validation, gRPC client."""
