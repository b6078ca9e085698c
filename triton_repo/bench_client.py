"""`nemo3 bench --server URL`: the runtime benchmark's workload sent through a Triton server.

Prompts are held-out corpus text cut to about `input_len` tokens (4 characters a token: the client
has no tokenizer); the server's own token counts give the throughput. Where the model takes
`min_tokens` (nemo3's repositories) every request asks for exactly `output_len` tokens, as the
in-process benchmark does with ignore_eos.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from ..engines.benchmark import Result, Workload
from .client import RequestOptions, TextClient


def server_prompts(workload: Workload) -> list[str]:
    from ..export.corpus import texts

    size, out = workload.input_len * 4, []
    for source in texts("heldout"):
        out += [source[i:i + size] for i in range(0, len(source) - size, size)]
        if len(out) >= workload.num_prompts:
            return out[:workload.num_prompts]
    raise ValueError(f"the held-out corpus yields {len(out)} prompts, fewer than --num-prompts={workload.num_prompts}")


def benchmark_server(url: str, model: str, workload: Workload) -> dict:
    client = TextClient(url, model=model)
    fixed = "min_tokens" in client.check()
    options = RequestOptions(max_tokens=workload.output_len, min_tokens=workload.output_len if fixed else None)
    result = Result(f"triton {model} at {url}", 0, 0.0, executor="triton server")
    accepted: list[float] = []

    def one(prompt: str) -> None:
        start, last, times = time.perf_counter(), None, []
        for chunk in client.stream(prompt, options):
            times.append(time.perf_counter())
            last = chunk
        result.ttft_s.append(times[0] - start)
        result.itl_s.extend(b - a for a, b in zip(times, times[1:]))
        result.output_tokens += last.num_output_tokens or 0
        if last.acceptance_length:
            accepted.append(last.acceptance_length)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workload.concurrency) as pool:
        list(pool.map(one, server_prompts(workload)))
    result.seconds = time.perf_counter() - start
    result.acceptance_length = sum(accepted) / len(accepted) if accepted else None
    row = result.summary()
    row.update(vs_bf16=None, vs_transformers=None)
    return {"workload": vars(workload), "device": f"server {url}", "results": [row]}
