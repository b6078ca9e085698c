"""The option vocabularies every command and stage shares (one home, so they cannot drift apart)."""

from __future__ import annotations

PRECISIONS = ("bf16", "fp8", "nvfp4")  # --precision: the build's weight format family
DEFAULT_PRECISION = "nvfp4"  # what a build is without --precision or --recipe
TARGETS = ("torch", "tensorrt", "trtllm")  # --target: what the Triton repository serves with
MOE_PARALLEL = ("ep", "tp")  # --moe-parallel: experts split across ranks (ep) or within each expert (tp)
ENGINE_DEVICES = ("cpu", "cuda")  # --engine-device: where the ahead-of-time engines run
EXECUTORS = ("aot", "tensorrt", "compiled", "eager")  # nemo3 bench --executor: a build's AOT engines, its TensorRT
# engines (--target tensorrt), steps compiled at load, eager
