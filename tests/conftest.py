"""Shared test fixtures: small Nemotron 3 configs and checkpoints written by transformers itself."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

# Triton's interpreter lets the GPU kernels run on CPU; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The test models are tiny: one intra-op thread avoids OpenMP start-up and contention costs that
# dominate their small ops on a 2-core machine (and keeps timings stable when other work runs).
torch.set_num_threads(1)
# Under pytest-xdist each worker compiles into an inductor cache of its own (concurrent compiles into one cache
# folder have corrupted it here).
if os.environ.get("PYTEST_XDIST_WORKER"):
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache_dir(), os.environ["PYTEST_XDIST_WORKER"])

BASE_CONFIG = dict(
    model_type="nemotron_h",
    vocab_size=96,
    hidden_size=32,
    layers_block_type=["linear_attention", "moe", "full_attention", "linear_attention", "moe"],
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=48,
    mamba_num_heads=4,
    mamba_head_dim=8,
    ssm_state_size=8,
    n_groups=2,
    conv_kernel=4,
    chunk_size=8,
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    moe_shared_expert_intermediate_size=24,
    moe_latent_size=None,
    n_group=1,
    topk_group=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    layer_norm_epsilon=1e-5,
    num_nextn_predict_layers=0,
)

# Configs the network must match transformers on (issue: foundation, "Must show").
CONFIGS = {
    "latent_grouped": dict(moe_latent_size=16, n_group=4, topk_group=2, num_experts_per_tok=3),
    "plain_moe": dict(),
    "with_mlp": dict(layers_block_type=["linear_attention", "mlp", "full_attention", "moe", "mlp"]),
    "many_attention": dict(layers_block_type=["full_attention", "linear_attention", "full_attention", "moe",
                                              "full_attention"], num_key_value_heads=1),
    "mtp": dict(moe_latent_size=16, n_group=2, topk_group=1, num_nextn_predict_layers=1,
                mtp_layers_block_type=["full_attention", "moe"]),
}


def make_config(name: str = "plain_moe", **overrides) -> dict:
    cfg = dict(BASE_CONFIG)
    cfg.update(CONFIGS[name])
    cfg.update(overrides)
    return cfg


def hf_model(config: dict, seed: int = 0):
    """transformers' NemotronHForCausalLM with random (but non-trivial) weights, fp32, eval mode."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(seed)
    model = NemotronHForCausalLM(NemotronHConfig(**config)).eval()
    with torch.no_grad():  # make biases, norms and A/D/dt non-trivial so a wrong formula shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("e_score_correction_bias") or name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("A_log") or name.endswith(".D") or name.endswith("dt_bias"):
                p.copy_(0.5 * torch.randn_like(p))
            elif p.dim() >= 2:
                p.normal_(0, 0.1)
    return model


def save_hf_checkpoint(model, folder: Path) -> Path:
    """What `save_pretrained` writes: hub tensor names with per-expert tensors, transformers-5 config keys."""
    model.save_pretrained(folder)
    return folder


def add_missing_tensors(folder: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for the tensors config.json implies but save_pretrained did not write (transformers has
    no MTP layers, nor attention / routed-expert biases), added to model.safetensors; returns them."""
    from safetensors.torch import load_file, save_file

    from nemo3.export.checkpoint import open_checkpoint
    from nemo3.export.names import expected_tensors

    path = folder / "model.safetensors"
    with open_checkpoint(folder) as ckpt:
        spec, present = ckpt.spec, set(ckpt.names())
    g = torch.Generator().manual_seed(seed)
    added = {}
    for name, shape in expected_tensors(spec).items():
        if name not in present:
            noise = torch.randn(shape, generator=g)
            added[name] = 1 + 0.1 * noise if name.endswith("norm.weight") else 0.1 * noise
    save_file({**load_file(path), **added}, path, metadata={"format": "pt"})
    return added


def copy_builtin_tokenizer(folder: Path) -> None:
    """The built-in model's tokenizer files, for test checkpoints whose vocabulary matches it."""
    import shutil

    from nemo3.export.builtin import BUILTIN_DIR

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(BUILTIN_DIR / name, folder / name)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """(transformers model, checkpoint folder) for the plain MoE config."""
    model = hf_model(make_config())
    return model, save_hf_checkpoint(model, tmp_path / "ckpt")


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2))


def assert_expert_paths_equal_the_loop(moe, hidden_size: int, token_counts: tuple[int, int]) -> None:
    """An MoE layer's static-shape expert paths (gathered: few (token, expert) pairs; dense: more pairs than
    experts) give the sum of its experts' own forwards, for each number of tokens."""
    g = torch.Generator().manual_seed(5)
    for tokens in token_counts:
        x = torch.randn(tokens, moe.stacked[0].shape[2], generator=g)
        weights, ids = moe.gate(torch.randn(tokens, hidden_size, generator=g))
        loop = torch.zeros(x.shape)
        for t in range(tokens):
            for w, e in zip(weights[t], ids[t].tolist()):
                loop[t] += w * moe.experts[str(e)](x[t:t + 1], reduce=False)[0]
        for path in (moe.run_experts_gathered, moe.run_experts_dense):
            assert torch.allclose(path(x, weights, ids), loop, rtol=1e-5, atol=1e-6), (tokens, path.__name__)


def snapshot(executor) -> dict[str, torch.Tensor]:
    """A copy of every state pool of a TorchExecutor (or an AOTExecutor), by its step programs' input name."""
    from nemo3.engines.executors.step_export import pool_fields

    return {name: getattr(entry, attr).clone() for name, entry, attr in pool_fields(executor.state)}


def prefill_and_compare(eager, compiled, prompts: list[list[int]], bound: float = 1e-6) -> None:
    """Prefill chunks through both executors (the compiled one from a copy of the eager one's state): row 0 starts
    its sequence and row 1 continues its own in one call of 11 tokens, row 2 starts with 13 tokens in another; both
    calls padded to 16 tokens per row and to max_sequences rows. Logits, hidden states and state pools within
    `bound` of the largest value of the eager calls'. (eager, compiled: TorchExecutors over the same weights, 4 slots.)"""
    from nemo3.engines.executors.base import RaggedBatch

    eager.forward(RaggedBatch.build([(prompts[1][:6], 0, 0)], [5]))
    compiled.state.layers = copy.deepcopy(eager.state.layers)
    ran = []  # the compiled prefill step really runs (not the eager fallback)
    step = compiled.compiled.backbone
    compiled.compiled.backbone = lambda *args: ran.append(args[0].shape) or step(*args)
    batch = RaggedBatch.build([(prompts[0][:11], 0, 2), (prompts[1][6:17], 6, 0), (prompts[2][:13], 0, 3)],
                              [10, 21, 34])
    want, got = eager.forward(batch), compiled.forward(batch)
    assert ran == [(len(compiled.state.pages.table), 16)] * 2
    assert (got.logits - want.logits).abs().max() <= bound * want.logits.abs().max()
    assert (got.hidden - want.hidden).abs().max() <= bound * want.hidden.abs().max()
    after_eager, after_compiled = snapshot(eager), snapshot(compiled)
    for name, t in after_eager.items():
        assert (after_compiled[name].float() - t.float()).abs().max() <= bound * max(t.float().abs().max(), 1), name
    del compiled.compiled.backbone  # (the class's method again)


def interruptible() -> None:
    """preexec_fn of a subprocess a test stops with Ctrl-C (SIGINT): the signal at its default disposition and
    unblocked in the child, as a terminal starts a command, whatever this pytest process's main thread inherited.
    (In the full suite on a loaded machine, two such tests once saw the child ignore SIGINT; alone they pass.)"""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def wait_interrupted(process: subprocess.Popen, timeout: float = 60) -> str:
    """Wait for a process sent SIGINT; on timeout kill it and fail with its and this process's signal masks."""
    try:
        return process.communicate(timeout=timeout)[1] if process.stderr else ""
    except subprocess.TimeoutExpired:
        masks = {who: {line.split(":")[0]: line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                       if line.startswith(("SigBlk", "SigIgn", "SigPnd", "ShdPnd"))}
                 for who, pid in (("child", process.pid), ("pytest", os.getpid()))}
        process.kill()
        process.communicate()
        raise AssertionError(f"{process.args[3:5]} did not stop within {timeout} s of SIGINT; signal masks {masks}")
