"""Serving benchmark: one workload run on several builds and on transformers' `generate()` in one process.

Every figure is measured in the same run, so ratios (to the BF16 build and to transformers) are
meaningful on any machine. Prompts are held-out text of the built-in corpus cut to exactly
`input_len` tokens (random token ids for a checkpoint without tokenizer), so no request needs padding.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..export.build_folder import BuildFolder, label_of, model_folder
from ..export.options import EXECUTORS
from .runtime.requests import GenerationParams


@dataclass(frozen=True)
class Workload:
    num_prompts: int = 16
    input_len: int = 64
    output_len: int = 64
    concurrency: int = 8
    seed: int = 0

    def __post_init__(self):
        for key in ("num_prompts", "input_len", "output_len", "concurrency"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')}={getattr(self, key)}: must be >= 1")


@dataclass(frozen=True)
class Target:
    """A checkpoint folder (or a build folder: its checkpoint/) served with MTP draft length `mtp`."""

    path: Path | None  # None: the built-in model
    mtp: int = 0
    label: str = ""
    executor: str | None = None  # one of EXECUTORS; None: the build's engines when it has them, else as `compile` says

    @property
    def name(self) -> str:
        return self.label or f"{label_of(self.path)}{f' mtp{self.mtp}' if self.mtp else ''}"


@dataclass
class Result:
    name: str
    output_tokens: int
    seconds: float
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)  # between consecutive outputs of a request
    tpot_s: list[float] = field(default_factory=list)  # per request: (last - first token time) / (tokens - 1)
    acceptance_length: float | None = None
    verify_steps: int = 0  # MTP verify steps, and the tokens they accepted (weighted by steps), over every round run
    accepted_tokens: float = 0.0
    executor: str = "eager"  # how decode steps ran: "aot", "compiled", "eager"; transformers: "generate()"
    weight_bytes: int | None = None  # resident weight memory of the served model (engines/network/quant_linear.py)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    def summary(self) -> dict:
        return {"name": self.name, "executor": self.executor, "output_tokens": self.output_tokens, "seconds": round(self.seconds, 3),
                "output_tokens_per_s": round(self.tokens_per_s, 2),
                "ttft_p50_ms": _ms(_percentile(self.ttft_s, 50)),
                "tpot_ms": _ms(statistics.mean(self.tpot_s) if self.tpot_s else None),
                "itl_p50_ms": _ms(_percentile(self.itl_s, 50)), "itl_p99_ms": _ms(_percentile(self.itl_s, 99)),
                "acceptance_length": None if self.acceptance_length is None else round(self.acceptance_length, 3),
                "weight_mb": None if self.weight_bytes is None else round(self.weight_bytes / 2**20, 2)}


def _percentile(values: list[float], q: int) -> float | None:
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _ms(seconds):
    return None if seconds is None else round(1000 * seconds, 2)


def workload_prompts(codec, vocab_size: int, workload: Workload) -> list[list[int]]:
    """`num_prompts` prompts of exactly `input_len` tokens: consecutive windows of held-out text."""
    if codec.tokenizer is None:
        g = torch.Generator().manual_seed(workload.seed)
        return torch.randint(3, vocab_size, (workload.num_prompts, workload.input_len), generator=g).tolist()
    from ..export.corpus import texts

    text, wanted = "", workload.num_prompts * workload.input_len * 8  # characters: ~4 per token, twice over
    for source in texts("heldout"):
        text += source
        if len(text) >= wanted:
            break
    ids = codec.encode(text)
    n = workload.input_len
    windows = [ids[i:i + n] for i in range(0, len(ids) - n, n)]
    if len(windows) < workload.num_prompts:
        raise ValueError(f"the held-out corpus yields {len(windows)} prompts of {n} tokens, fewer than "
                         f"--num-prompts={workload.num_prompts}")
    return windows[:workload.num_prompts]


def run_engine(engine, prompts: list[list[int]], workload: Workload, name: str, result: Result | None = None) -> Result:
    """Closed loop: `concurrency` requests in flight; a new one starts when one finishes. Adds to `result` (another
    round of the same target) when given."""
    params = GenerationParams(max_tokens=workload.output_len, ignore_eos=True)
    pending = list(prompts)
    result = result or Result(name, 0, 0.0)
    start = time.perf_counter()
    for _ in range(min(workload.concurrency, len(pending))):
        engine.add_request(pending.pop(0), params)
    while engine.has_work():
        for delta in engine.step():
            result.output_tokens += len(delta.token_ids)
            if delta.finished:
                stats = delta.stats
                result.ttft_s.append(stats["time_to_first_token_s"])
                result.itl_s.extend(stats["inter_token_latencies_s"])
                if "time_per_output_token_s" in stats:
                    result.tpot_s.append(stats["time_per_output_token_s"])
                if "verify_steps" in stats:
                    result.verify_steps += stats["verify_steps"]
                    result.accepted_tokens += stats["acceptance_length"] * stats["verify_steps"]
                if pending:
                    engine.add_request(pending.pop(0), params)
    result.seconds += time.perf_counter() - start
    result.acceptance_length = result.accepted_tokens / result.verify_steps if result.verify_steps else None
    return result


def run_transformers(folder: Path, prompts: list[list[int]], workload: Workload, batch_size: int,
                     device: str = "cpu") -> Result:
    """The peer baseline: transformers' NemotronHForCausalLM.generate, greedy, `batch_size` prompts per call
    (the workload's concurrency: static batching; 1: one request at a time, as a plain HF serving loop), in
    the dtype nemo3 loads on that device (float32 on CPU, bfloat16 elsewhere)."""
    from transformers import NemotronHForCausalLM

    dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    model = NemotronHForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    result = Result(f"transformers generate() batch {batch_size}", 0, 0.0, executor="generate()")
    with torch.inference_mode():  # warm-up (kernels, allocator), as the nemo3 engines get
        warm = torch.tensor(prompts[:1], device=device)
        model.generate(warm, attention_mask=torch.ones_like(warm), do_sample=False, max_new_tokens=4, pad_token_id=0)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            batch = torch.tensor(prompts[i:i + batch_size], device=device)
            out = model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=False,
                                 max_new_tokens=workload.output_len, min_new_tokens=workload.output_len,
                                 pad_token_id=0)
            result.output_tokens += (out.shape[1] - batch.shape[1]) * batch.shape[0]
    result.seconds = time.perf_counter() - start
    return result


def run_benchmark(targets: list[Target], workload: Workload, device: str = "cpu", transformers_baseline: bool = True,
                  max_num_tokens: int = 512, compile: bool = True, rounds: int = 3, log=print) -> dict:
    """Each target, then transformers; `compile`: decode steps run compiled (CUDA graphs on GPU), compiled before
    the clock starts, quantized builds included. Every target is loaded (compiled, warmed up) first, then the
    workload runs `rounds` times, each round once on every target in turn, and a target's figures are over all its
    rounds: load that comes and goes on a shared machine falls on every target alike, not on whichever ran then.
    Each build's resident weight bytes are reported against bf16's."""
    from .network.quant_linear import resident_weight_bytes

    if rounds < 1:
        raise ValueError(f"--rounds={rounds}: must be >= 1")
    results, prompts, engines = [], None, []
    try:
        for target in targets:
            prompts = _open_target(target, workload, device, max_num_tokens, compile, prompts, engines, log)
        results = [Result(target.name, 0, 0.0) for target in targets]
        for _ in range(rounds):
            for result, (target, engine) in zip(results, engines):
                run_engine(engine, prompts, workload, target.name, result)
        for result, (target, engine) in zip(results, engines):
            result.executor = engine.executor.kind
            result.weight_bytes = resident_weight_bytes(engine.executor.model)
            log(f"{target.name}: {result.tokens_per_s:.1f} output tokens/s ({result.executor})")
    finally:
        for _, engine in engines:
            engine.executor.close()  # (a --tp N build's worker ranks)
    peer = None
    if transformers_baseline:
        for batch_size in sorted({workload.concurrency, 1}, reverse=True):
            results.append(run_transformers(model_folder(targets[0].path), prompts, workload, batch_size, device))
            log(f"{results[-1].name}: {results[-1].tokens_per_s:.1f} output tokens/s")
            peer = peer or results[-1]  # ratios are to the batched (strongest) baseline
    rows = [r.summary() for r in results]
    bf16 = next((r for r in results if r.name == "bf16"), results[0])
    for row, r in zip(rows, results):
        row["vs_bf16"] = round(r.tokens_per_s / bf16.tokens_per_s, 3)
        row["vs_transformers"] = None if peer is None else round(r.tokens_per_s / peer.tokens_per_s, 3)
        row["weight_vs_bf16"] = (None if r.weight_bytes is None or bf16.weight_bytes is None
                                 else round(r.weight_bytes / bf16.weight_bytes, 3))
    return {"workload": asdict(workload), "rounds": rounds, "device": device, "torch_threads": torch.get_num_threads(),
            "results": rows}


def _open_target(target: Target, workload: Workload, device: str, max_num_tokens: int, compile: bool,
                 prompts: list[list[int]] | None, engines: list, log) -> list[list[int]]:
    """Open `target`'s serving stack (its steps compiled as `compile` and its executor say), append (target, engine)
    to `engines`, warm it up with one whole request; return the workload's prompts (made by the first target)."""
    from .executors.compiled_step import unsupported
    from .runtime.factory import StackOptions, open_scheduler

    kind = target.executor
    if kind not in (None, *EXECUTORS):
        raise ValueError(f"--executor {kind!r}: expected one of {', '.join(EXECUTORS)}")
    steps_compiled = compile if kind is None else kind == "compiled"
    if steps_compiled:
        log(f"{target.name}: compiling the decode steps where the model allows it (unless it has engines)")
    shape = engine_shape(target.path)  # a build with engines: every executor serves the engines' shapes
    max_sequences, max_length = shape or (workload.concurrency,
                                          workload.input_len + workload.output_len + target.mtp + 1)
    engine = open_scheduler(target.path, StackOptions(
        device=device, max_sequences=max_sequences, max_length=max_length, max_num_tokens=max_num_tokens,
        num_speculative_tokens=target.mtp, compile=steps_compiled,
        engines=None if kind is None else kind in ("aot", "tensorrt")))
    engines.append((target, engine))  # (closed by the caller)
    if kind in ("aot", "tensorrt") and engine.executor.kind != kind:
        raise ValueError(f"--executor {kind}: {target.path} has {engine.executor.kind} engines")
    if steps_compiled and engine.executor.kind == "eager":
        log(f"{target.name}: eager decode steps ({unsupported(engine.executor.model)})")
    prompts = prompts or workload_prompts(engine.codec, engine.executor.spec.vocab_size, workload)
    # warm-up: one whole request, so that every bound on the pages a compiled step reads (CPU) is compiled
    run_engine(engine, prompts[:1], Workload(1, workload.input_len, workload.output_len, 1), target.name)
    return prompts


def engine_shape(path) -> tuple[int, int] | None:
    """(max_sequences, max_length) of a build's engines (AOT, or TensorRT once built), or None when it has none."""
    from .executors.aot_manifest import MANIFEST, Manifest
    from .executors.tensorrt_executor import plan_path
    from .executors.tensorrt_folder import MANIFEST as TENSORRT_MANIFEST, read_manifest

    build = BuildFolder.of(path)
    graphs = read_manifest(build.tensorrt)["graphs"] if build and (build.tensorrt / TENSORRT_MANIFEST).is_file() else []
    if graphs and all(plan_path(build.tensorrt, graph).is_file() for graph in graphs):
        return graphs[0]["rows"], graphs[0]["max_length"]
    if build is None or not (build.engines / MANIFEST).is_file():
        return None
    manifest = Manifest.read(build.engines)
    return None if manifest.unsupported else (manifest.max_sequences, manifest.max_length)


def markdown_table(report: dict) -> str:
    cols = ["name", "executor", "output_tokens_per_s", "vs_bf16", "vs_transformers", "ttft_p50_ms", "tpot_ms", "itl_p50_ms",
            "itl_p99_ms",
            "acceptance_length", "weight_mb", "weight_vs_bf16"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in report["results"]:
        lines.append("| " + " | ".join("" if row.get(c) is None else str(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(rows)))
    ax.barh([r["name"] for r in rows], [r["output_tokens_per_s"] for r in rows], color="#76b900")
    for i, r in enumerate(rows):
        ax.text(r["output_tokens_per_s"], i, f" {r['output_tokens_per_s']:.0f}", va="center")
    w = report["workload"]
    ax.set_xlabel("output tokens/s")
    ax.set_title(f"{w['num_prompts']} prompts, {w['input_len']} in / {w['output_len']} out, "
                 f"concurrency {w['concurrency']} ({report['device']})")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
