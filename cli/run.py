"""`nemo3 run --tp N PROMPT`: greedy generation with the network split over N tensor-parallel ranks."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..export.options import MOE_PARALLEL
from .common import one_line_errors


@click.command("run")
@click.argument("prompt")
@click.option("--checkpoint", "path", type=click.Path(exists=True, file_okay=False), default=None,
              help="Checkpoint or build folder; each rank cuts its part of every tensor as it reads "
                   "(default: the built-in model).")
@click.option("--build", type=click.Path(exists=True, file_okay=False), default=None,
              help="Build folder: each rank reads its own OUT/ranks/rank{r}/, written for the build's --tp.")
@click.option("--tp", type=int, default=None,
              help="Tensor-parallel ranks  [default: the build's, or torchrun's WORLD_SIZE, or 1]")
@click.option("--moe-parallel", type=click.Choice(MOE_PARALLEL), default=None,
              help="Routed experts: whole experts per rank (ep) or a slice of each (tp)  [default: ep, or the "
                   "build's]")
@click.option("--max-tokens", type=int, default=32, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu (gloo) or cuda (NCCL, one GPU per rank).")
@one_line_errors
def command(prompt, path, build, tp, moe_parallel, max_tokens, device):
    """Print PROMPT and its greedy continuation, the network split over --tp ranks.

    The ranks are spawned here and meet on 127.0.0.1; under torchrun this process is one of them:
    `torchrun --nproc-per-node 4 --no-python nemo3 run --tp 4 PROMPT`. Rank 0 prints. (`nemo3 generate
    --build OUT` serves a --tp N build through the full runtime.)
    """
    from ..engines.runtime.launcher import default_backend, launch, under_torchrun
    from ..engines.network.loading import read_rank_config
    from ..engines.runtime.text import TextCodec
    from ..export.build_folder import model_folder
    from ..export.sharding import check_tp
    from ..export.spec import ModelSpec

    if path and build:
        raise click.UsageError("give --checkpoint or --build, not both")
    if max_tokens < 1:
        raise click.BadParameter(f"{max_tokens}: must be >= 1", param_hint="--max-tokens")
    if build:
        where, config = read_rank_config(build)
        built = (config["world_size"], config["moe_parallel"])
        tp, moe_parallel = tp or built[0], moe_parallel or built[1]
        if (tp, moe_parallel) != built:
            raise click.UsageError(f"{build}: its ranks were written for --tp {built[0]} --moe-parallel {built[1]}")
        spec = ModelSpec.from_config(config["model"], source=str(where / "config.json"))
        source, text_folder = Path(build), Path(config["source"]["checkpoint"])
    else:
        source = text_folder = model_folder(path)
        spec = ModelSpec.from_file(source)
        tp, moe_parallel = tp or (int(os.environ["WORLD_SIZE"]) if under_torchrun() else 1), moe_parallel or "ep"
        check_tp(spec, tp, moe_parallel)
    prompt_ids = TextCodec.from_checkpoint(text_folder, spec).encode(prompt)
    launch(run_rank, tp, default_backend(device),
           args=(str(source), bool(build), moe_parallel, prompt, prompt_ids, max_tokens, device, str(text_folder)))


def run_rank(source: str, from_ranks: bool, moe_parallel: str, prompt: str, prompt_ids: list[int], max_tokens: int,
             device: str, text_folder: str) -> None:
    """One rank: load its part of the model, decode greedily; rank 0 prints the text as it comes."""
    from ..engines.evaluation.greedy import greedy_tokens
    from ..engines.network.loading import load, load_rank
    from ..engines.network.parallel import Parallel
    from ..engines.runtime.text import Detokenizer, TextCodec

    parallel = Parallel.from_process_group(moe_parallel)
    model = load_rank(source, parallel, device) if from_ranks else load(source, device, parallel=parallel)
    codec = TextCodec.from_checkpoint(text_folder, model.spec)
    detokenizer, printing = Detokenizer(codec), parallel.rank == 0
    if printing:
        click.echo(prompt, nl=False)
    for token in greedy_tokens(model, prompt_ids, max_tokens, codec.eos_ids):
        text, _ = detokenizer.push([token])
        if printing:
            click.echo(text, nl=False)
    if printing:
        click.echo(detokenizer.flush())
