"""Ahead-of-time compilation of a Triton kernel launch for an NVIDIA GPU, on any machine (no GPU needed).

`compile_launch(kernel, args, meta)` compiles exactly what `kernel[grid](*args, **meta)` would compile at run
time (same type inference and specialization: integers equal to 1 become constants, integers and
pointers divisible by 16 are marked so), for a chosen compute capability. CPU-only CI uses it to check
that the kernels compile for Hopper (Triton's interpreter is far more lenient than its compiler); the
PTX it returns is what a TensorRT plugin embeds. Needs a process where TRITON_INTERPRET is off: kernels
decorated under the interpreter cannot be compiled.
"""

from __future__ import annotations

from .dispatch import interpreter_enabled

WHERE = "plugins/aot.py"
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas")


def compile_launch(kernel, args: tuple, meta: dict, capability: int = 90):
    """triton's CompiledKernel (asm: ttir, ttgir, llir, ptx, cubin) for an sm_<capability> GPU."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    _require_compiler(kernel)
    constexprs = {name: value for name, value in meta.items() if name not in LAUNCH_OPTIONS}
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        kind, specialization = native_specialize_impl(BaseBackend, args[index], False, True, True)[:2]
        if kind == "constexpr":
            constexprs[name] = specialization
            signature[name] = "constexpr"
            continue
        signature[name] = kind
        if specialization == "D":
            attrs[(index,)] = [["tt.divisibility", 16]]
    options = {k: v for k, v in meta.items() if k in LAUNCH_OPTIONS}
    return compile_signature(kernel, signature, constexprs, options, capability, attrs)


def compile_signature(kernel, signature: dict, constexprs: dict, options: dict, capability: int = 90,
                      attrs: dict | None = None):
    """triton's CompiledKernel for an explicit signature ({arg name: "*bf16" | "i32" | ... | "constexpr"})."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _require_compiler(kernel)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs or {}),
                          target=GPUTarget("cuda", capability, 32), options=options)


def _require_compiler(kernel) -> None:
    if interpreter_enabled() or not hasattr(kernel, "arg_names"):
        raise RuntimeError(f"{WHERE}: kernels can only be compiled in a process with TRITON_INTERPRET off")
