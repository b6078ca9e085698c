"""Tensor and expert parallelism: tp 2 and tp 4 ranks (spawned processes, gloo) give the logits of tp 1.

One spawn per (model, tp) runs every check on every rank for both --moe-parallel modes: a stateless
forward, a prefill then decode steps with a state, the MTP head (whole sequence and recursive drafts),
and loading the rank's weights from per-rank checkpoints (export/rank_writer.py) instead of cutting
them from the full checkpoint. Rank 0 writes what it computed to a safetensors file the test reads.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import weakref

import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner
from conftest import add_missing_tensors, hf_model, make_config, save_hf_checkpoint
from safetensors.torch import load_file, save_file
from test_network import rel_err

from nemo3.cli.main import main
from nemo3.engines.evaluation.greedy import greedy_tokens
from nemo3.engines.runtime.launcher import launch
from nemo3.engines.network.loading import load, load_rank
from nemo3.engines.network.model import Model
from nemo3.engines.network.parallel import Parallel
from nemo3.engines.runtime.text import TextCodec
from nemo3.export.rank_writer import write_ranks
from nemo3.export.sharding import ShardError

MOE_MODES = ("ep", "tp")
# LatentMoE in 4 routing groups, attention (2 KV heads: replicated at tp 4), an MLP layer, MTP "*E", and
# every bias (row-parallel biases must be added once). Every count divides by 2 and 4: attention heads 4,
# Mamba heads 8 in 4 groups, 8 experts, intermediate sizes 48 / 16 / 24, vocabulary 96.
RANDOM_CONFIG = make_config(
    "mtp", layers_block_type=["linear_attention", "moe", "full_attention", "mlp", "linear_attention", "moe"],
    mamba_num_heads=8, n_groups=4, n_group=4, topk_group=2, num_experts_per_tok=3,
    use_bias=True, mlp_bias=True, attention_bias=True)
PREFILL, DECODE = 10, 3  # a prefill longer than MAX_STEP_TOKENS (the chunked scan), then decode steps


def write_word_tokenizer(folder, vocab_size: int) -> None:
    """A tokenizer.json whose token i is the word `w{i}`, so that `nemo3 run` can take and print text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))


def checks(model) -> dict[str, torch.Tensor]:
    """Every fp32 result compared across --tp values (on the CPU)."""
    ids = torch.randint(0, model.spec.vocab_size, (2, PREFILL + DECODE), generator=torch.Generator().manual_seed(0))
    ids, device = ids.to(model.device), model.device
    out = {}
    with torch.inference_mode():
        out["forward"] = model.logits(ids)
        state = model.new_state(max_sequences=3, max_length=PREFILL + DECODE)
        slots = torch.tensor([2, 0], device=device)
        steps = [model.logits(ids[:, :PREFILL], state, slots, torch.zeros(2, dtype=torch.long, device=device))]
        for t in range(PREFILL, PREFILL + DECODE):
            steps.append(model.logits(ids[:, t:t + 1], state, slots, torch.full((2,), t, device=device)))
        out["prefill_decode"] = torch.cat(steps, dim=1)
        out["mtp"] = model.mtp_sequence_logits(ids)
        out["mtp_drafts"] = model.mtp_logits(ids, k=2)
    return {key: value.cpu() for key, value in out.items()}


def rank_worker(checkpoint: str, ranks: dict[str, str], out_file: str, device: str = "cpu") -> None:
    """Runs on every rank (inside the process group): all checks, both MoE modes."""
    results = {}
    for moe in MOE_MODES:
        parallel = Parallel.from_process_group(moe)
        model = load(checkpoint, device, torch.float32, parallel)
        spec = model.spec
        held = len(model.backbone.layers[spec.layer_types.index("E")].mixer.experts)
        assert held == (spec.n_routed_experts // parallel.world_size if moe == "ep" else spec.n_routed_experts)
        results.update({f"{moe}.{key}": value for key, value in checks(model).items()})
        mine = results[f"{moe}.forward"].to(device)  # every rank must hold the same logits
        every_rank = [torch.empty_like(mine) for _ in range(parallel.world_size)]
        dist.all_gather(every_rank, mine)
        assert all(torch.equal(other, mine) for other in every_rank), f"{moe}: the ranks' logits differ"
        from_ranks = load_rank(ranks[moe], parallel, device, torch.float32).state_dict()
        for name, value in model.state_dict().items():
            assert torch.equal(from_ranks[name], value), f"rank {parallel.rank}, {moe}: {name} differs"
    if parallel.rank == 0:
        save_file(results, out_file)


@pytest.fixture(scope="module")
def random_case(tmp_path_factory):
    """(checkpoint folder with a word tokenizer, the tp 1 model, its check results) for RANDOM_CONFIG."""
    folder = save_hf_checkpoint(hf_model(RANDOM_CONFIG), tmp_path_factory.mktemp("tp_random"))
    add_missing_tensors(folder, seed=1)
    write_word_tokenizer(folder, RANDOM_CONFIG["vocab_size"])
    model = load(folder)
    return folder, model, checks(model)


@pytest.fixture(scope="module", params=["random", "builtin"])
def case(request, random_case):
    if request.param == "random":
        return random_case
    from nemo3.export.builtin import BUILTIN_DIR

    if not (BUILTIN_DIR / "model.safetensors").exists():
        pytest.skip("the built-in model has not been trained into export/builtin/ yet")
    model = load(BUILTIN_DIR)
    return BUILTIN_DIR, model, checks(model)


def run_ranks(case, tp: int, backend: str, folder) -> dict[str, float]:
    """Spawn `tp` ranks running rank_worker on case's checkpoint; the relative error of each of rank 0's
    results against tp 1."""
    checkpoint, _, want = case
    ranks = {moe: str(folder / f"ranks_{moe}") for moe in MOE_MODES}
    for moe, path in ranks.items():
        write_ranks(checkpoint, path, tp, moe)
    out_file = folder / "rank0.safetensors"
    device = "cuda" if backend == "nccl" else "cpu"
    launch(rank_worker, tp, backend, args=(str(checkpoint), ranks, str(out_file), device))
    got = load_file(out_file)
    return {f"{moe}.{key}": rel_err(got[f"{moe}.{key}"], value) for moe in MOE_MODES for key, value in want.items()}


@pytest.mark.parametrize("tp", [2, 4])
def test_ranks_give_the_logits_of_tp1(case, tp, tmp_path):
    errors = run_ranks(case, tp, "gloo", tmp_path)
    assert max(errors.values()) <= 1e-4, errors


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL over tensor-parallel ranks needs 2 GPUs")
def test_nccl_ranks_give_the_logits_of_tp1(random_case, tmp_path):
    errors = run_ranks(random_case, 2, "nccl", tmp_path)
    assert max(errors.values()) <= 1e-4, errors


def test_nemo3_run_prints_the_greedy_text_of_tp1(random_case, tmp_path):
    """`nemo3 run` from a build's per-rank checkpoints, its two ranks spawned, prints what tp 1 decodes."""
    folder, model, _ = random_case
    codec = TextCodec.from_checkpoint(folder, model.spec)
    prompt = codec.decode(torch.randint(3, model.spec.vocab_size, (6,), generator=torch.Generator().manual_seed(3))
                          .tolist())
    want = prompt + codec.decode(list(greedy_tokens(model, codec.encode(prompt), 5, codec.eos_ids))) + "\n"
    write_ranks(folder, tmp_path / "ranks", 2, "tp")
    nemo3 = [sys.executable, "-c", "from nemo3.cli.main import main; main()"]
    run = subprocess.run(nemo3 + ["run", "--build", str(tmp_path), prompt, "--max-tokens", "5"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == want


def test_an_indivisible_tp_is_a_one_line_error(random_case):
    folder, model, _ = random_case
    with pytest.raises(ShardError, match=r"^--tp 3: .*valid --tp values for this model: 1, 2, 4"):
        Model(model.spec, Parallel(world_size=3, rank=0))
    result = CliRunner().invoke(main, ["run", "--checkpoint", str(folder), "--tp", "3", "w1 w2"])
    assert result.exit_code == 1 and result.output.startswith("Error: --tp 3: ")
    assert len(result.output.splitlines()) == 1


def test_under_torchrun_tp_must_be_the_world_size(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--tp 4, but torchrun started WORLD_SIZE=2 processes"):
        launch(print, 4)


def fail_on_rank_1() -> None:
    if dist.get_rank() == 1:
        raise ValueError("rank 1 cannot go on")
    dist.all_reduce(torch.zeros(1))  # rank 0 waits for rank 1 at a collective until the spawner stops it


def test_a_failing_rank_stops_the_run_with_its_error():
    with pytest.raises(RuntimeError, match=r"^rank 1 of 2 failed: ValueError: rank 1 cannot go on$"):
        launch(fail_on_rank_1, 2)


def test_settle_returns_once_the_collectives_thread_has_let_go_of_the_lent_tensors():
    """An eager collective's tensor may outlive the call in a gloo worker thread, which takes the GIL to let go of its
    Python object: settle() waits for that, or a package started meanwhile holds the GIL the thread needs (a
    deadlock). A thread of ours stands in for gloo's, letting go 50 ms after the call."""
    parallel, held, lent = Parallel(), [], []

    def collective(x: torch.Tensor) -> None:
        held.append(x)
        lent.append(weakref.ref(x))

        def drop():
            time.sleep(0.05)
            held.clear()

        threading.Thread(target=drop).start()

    parallel._lend(collective, torch.ones(4))
    assert lent[0]() is not None  # the thread still holds it
    parallel.settle()
    assert lent[0]() is None
