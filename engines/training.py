"""Train the built-in model: plain PyTorch on CPU, seeded, resumable, next-token plus MTP loss.

    python -m nemo3.engines.training --workdir WORK --threads 1     # 1000 steps, ~45 min on 2 shared cores

WORK/ holds everything: `model/` (config.json, tokenizer files, and at the end model.safetensors in
hub naming: the folder export/builtin/ ships), and the resumable training state
`train_state.safetensors` (weights, router biases and AdamW moments, prefixed `model.` and `adam.`)
with `train_state.json` (step, options, log), and the tokenized corpus `tokens.safetensors`. Running
the same command again continues from the last saved step; nothing is ever unpickled.

Loss per position t of a window x_0..x_L: cross-entropy of the lm_head's logits for x_{t+1}, plus
`mtp_weight` times the cross-entropy of the MTP head's logits for x_{t+2} (its inputs: x_{t+1} and
the backbone's final hidden state at t), so that the MTP drafts are useful. Batches are random
windows of the training token stream, drawn from a generator seeded by (seed, step): a resumed run
sees the batches an uninterrupted one would. Router correction biases are trained the
DeepSeek-V3 way (auxiliary-loss-free balancing): after each step an expert's bias moves by
`balance_rate` towards equal load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..export import corpus
from ..export.builtin_config import BUILTIN_CONFIG
from ..export.spec import ModelSpec
from ..export.tokenizer import load_tokenizer
from .evaluation.heldout import next_token_logits
from .network.model import Model
from .network.moe import Router

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
MODEL_FOLDER = "model"
TOKENS = "tokens.safetensors"


@dataclass(frozen=True)
class TrainOptions:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_weight: float = 0.5
    balance_rate: float = 1e-2
    vocab_size: int = BUILTIN_CONFIG["vocab_size"]
    seed: int = 0

    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine decay to min_lr_ratio * lr at the last step."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- model ---------------------------------------------------------------------------------------
def builtin_spec(vocab_size: int) -> ModelSpec:
    return ModelSpec.from_config({**BUILTIN_CONFIG, "vocab_size": vocab_size}, source="export/builtin_config.py")


@torch.no_grad()
def initialize(model: Model, seed: int) -> None:
    """Random initialization in the style of Megatron/transformers' NemotronH.

    Matrices N(0, 0.02), residual-branch outputs scaled by 1/sqrt(2 * layers); norms 1; Mamba-2:
    A = -(1..16 uniform), D = 1, softplus(dt_bias) log-uniform in [time_step_min, time_step_max];
    conv1d uniform(+-1/sqrt(kernel)); router correction biases 0.
    """
    spec = model.spec
    cfg = spec.raw
    g = torch.Generator().manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * (spec.num_layers + len(spec.mtp_layer_types)))
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 2)
        if name.endswith("norm.weight") or name.endswith("norm_f.weight") or name.endswith("layernorm.weight"):
            p.fill_(1.0)
        elif name.endswith("A_log"):
            p.copy_(torch.empty(p.shape).uniform_(1, 16, generator=g).log())
        elif name.endswith(".D"):
            p.fill_(1.0)
        elif name.endswith("dt_bias"):
            lo, hi = math.log(cfg.get("time_step_min", 1e-3)), math.log(cfg.get("time_step_max", 0.1))
            dt = (torch.rand(p.shape, generator=g) * (hi - lo) + lo).exp().clamp(min=cfg.get("time_step_floor", 1e-4))
            p.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        elif "conv1d" in name:
            bound = 1 / math.sqrt(p.shape[-1]) if name.endswith("weight") else 0.0
            p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=g) if bound else torch.zeros(p.shape))
        elif p.dim() >= 2:
            residual = leaf[-2] in ("out_proj", "o_proj", "down_proj", "fc2_latent_proj")
            p.copy_(torch.randn(p.shape, generator=g) * (residual_std if residual else 0.02))
        else:  # biases (none in the built-in config)
            p.zero_()
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.zero_()


class RouterTraining:
    """Forward hooks on every router: differentiable routing weights, and expert load counts.

    The routing op returns its weights without a gradient formula; the hook recomputes the same
    weights (sigmoid scores of the chosen experts, renormalized, scaled) from the router's input so
    the router weights learn. The chosen ids are counted for auxiliary-loss-free balancing.
    """

    def __init__(self, model: Model):
        self.routers = [m for m in model.modules() if isinstance(m, Router)]
        self.counts = [torch.zeros(r.e_score_correction_bias.shape[0]) for r in self.routers]
        for i, router in enumerate(self.routers):
            router.register_forward_hook(self._hook(i))

    def _hook(self, index: int):
        def hook(router: Router, inputs, output):
            ids = output[1].long()
            if router.training:
                self.counts[index] += torch.bincount(ids.flatten(), minlength=self.counts[index].shape[0]).float()
            scores = F.linear(inputs[0].float(), router.weight.float()).sigmoid().gather(1, ids)
            if router.norm_topk_prob:
                scores = scores / (scores.sum(-1, keepdim=True) + 1e-20)
            return scores * router.routed_scaling_factor, output[1]
        return hook

    @torch.no_grad()
    def balance(self, rate: float) -> float:
        """Move each correction bias towards equal expert load; return the worst max/mean load ratio."""
        worst = 0.0
        for router, counts in zip(self.routers, self.counts):
            if counts.sum() > 0:
                load = counts / counts.mean()
                router.e_score_correction_bias += rate * torch.sign(1 - load)
                worst = max(worst, float(load.max()))
            counts.zero_()
        return worst


def batch_losses(model: Model, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """windows [B, L+1] -> (main cross-entropy, MTP cross-entropy), each a mean over its positions.

    Main: positions 0..L-1 predict x_1..x_L. MTP: position t in 0..L-2 reads x_{t+1} and the
    backbone's final hidden state c_t and predicts x_{t+2}.
    """
    L = windows.shape[1] - 1
    hidden = model.final_hidden(model(windows[:, :L]))
    logits = model.lm_head(hidden).float()
    main = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    mtp_logits, _ = model.mtp_draft(windows[:, 1:L], hidden[:, :L - 1])
    mtp = F.cross_entropy(mtp_logits.flatten(0, 1), windows[:, 2:].flatten())
    return main, mtp


def sample_windows(stream: torch.Tensor, batch_size: int, length: int, seed: int, step: int) -> torch.Tensor:
    """[batch_size, length] random windows of `stream`; the same (seed, step) gives the same batch."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, stream.numel() - length + 1, (batch_size,), generator=g)
    return stream[starts[:, None] + torch.arange(length)]


def heldout_loss(model: Model, stream: torch.Tensor, length: int, windows: int = 16) -> float:
    """Mean next-token cross-entropy over the first `windows` non-overlapping windows of `stream`."""
    n = min(windows, stream.numel() // length)
    rows = stream[: n * length].view(n, length)
    with torch.no_grad():
        _, logits = next_token_logits(model, rows)
    return float(F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()))


# ---- checkpoint ------------------------------------------------------------------------------------
def save_state(workdir: Path, model: Model, optimizer: torch.optim.Optimizer, step: int, options: TrainOptions,
               log: list[dict]) -> None:
    """Atomically write train_state.safetensors + train_state.json (the json last: it marks completeness)."""
    from safetensors.torch import save_file

    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {f"model.{n}": t.detach().contiguous() for n, t in model.state_dict().items()}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            tensors[f"adam.{names[id(p)]}.{key}"] = value.detach().contiguous()
    tmp = workdir / (STATE_TENSORS + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, workdir / STATE_TENSORS)
    meta = {"step": step, "options": dataclasses.asdict(options), "log": log}
    tmp = workdir / (STATE_JSON + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, workdir / STATE_JSON)


def load_state(workdir: Path, model: Model, optimizer: torch.optim.Optimizer, options: TrainOptions
               ) -> tuple[int, list[dict]]:
    """Restore a saved run; (0, []) if there is none. Options other than `steps` must match the saved run."""
    from safetensors.torch import load_file

    meta_path = workdir / STATE_JSON
    if not meta_path.exists():
        return 0, []
    meta = json.loads(meta_path.read_text())
    saved = TrainOptions(**meta["options"])
    for f in dataclasses.fields(TrainOptions):
        if f.name != "steps" and getattr(saved, f.name) != getattr(options, f.name):
            raise ValueError(f"{meta_path}: the saved run used --{f.name.replace('_', '-')}="
                             f"{getattr(saved, f.name)}, not {getattr(options, f.name)}; use a new --workdir")
    tensors = load_file(str(workdir / STATE_TENSORS))
    model.load_state_dict({n[len("model."):]: t for n, t in tensors.items() if n.startswith("model.")}, strict=True)
    params = dict(model.named_parameters())
    for name, t in tensors.items():
        if name.startswith("adam."):
            param, key = name[len("adam."):].rsplit(".", 1)
            optimizer.state[params[param]][key] = t
    return int(meta["step"]), list(meta["log"])


def export_model(model: Model, folder: Path) -> None:
    """model.safetensors in hub naming (the state dict's names are the canonical ones), fp32."""
    from safetensors.torch import save_file

    tensors = {n: t.detach().float().contiguous() for n, t in model.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


# ---- the run ---------------------------------------------------------------------------------------
def prepare_model_folder(folder: Path, options: TrainOptions) -> ModelSpec:
    """Tokenizer (trained on the training split if absent) and config.json; returns the spec."""
    from ..export.tokenizer_train import save_tokenizer, train_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "tokenizer.json").exists():
        save_tokenizer(train_tokenizer(corpus.texts("train"), options.vocab_size), folder,
                       BUILTIN_CONFIG["max_position_embeddings"])
    spec = builtin_spec(options.vocab_size)
    (folder / "config.json").write_text(json.dumps(spec.raw, indent=2) + "\n")
    return spec


def token_streams(workdir: Path, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) token streams of the corpus, cached in WORK/tokens.safetensors for that tokenizer."""
    import hashlib

    from safetensors.torch import load_file, save_file

    tokenizer_file = workdir / MODEL_FOLDER / "tokenizer.json"
    key = hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
    cache = workdir / TOKENS
    if cache.exists():
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as f:
            if (f.metadata() or {}).get("tokenizer_sha256") == key:
                streams = load_file(str(cache))
                return streams["train"], streams["heldout"]
    tokenizer = load_tokenizer(tokenizer_file.parent)
    train, _ = corpus.token_stream(corpus.texts("train"), tokenizer, spec.bos_token_id, spec.eos_token_id)
    heldout, _ = corpus.token_stream(corpus.texts("heldout"), tokenizer, spec.bos_token_id, spec.eos_token_id)
    save_file({"train": train, "heldout": heldout}, str(cache), metadata={"tokenizer_sha256": key})
    return train, heldout


def make_optimizer(model: Model, options: TrainOptions) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not norms, biases, A_log, D, dt_bias)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": options.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=options.lr, betas=(0.9, 0.95), eps=1e-8)


def train(workdir: str | Path, options: TrainOptions, checkpoint_every: int = 50, eval_every: int = 250,
          progress: bool = True, stop_after: int | None = None) -> Model:
    """Run (or continue) training in `workdir` up to `options.steps`; then write WORK/model/model.safetensors.

    `stop_after`: save and return after this step instead (an interruption: running again continues).
    """
    from tqdm import tqdm

    workdir = Path(workdir)
    folder = workdir / MODEL_FOLDER
    spec = prepare_model_folder(folder, options)
    train_stream, heldout_stream = token_streams(workdir, spec)
    torch.manual_seed(options.seed)
    model = Model(spec)
    initialize(model, options.seed)
    optimizer = make_optimizer(model, options)
    step, log = load_state(workdir, model, optimizer, options)
    routers = RouterTraining(model)
    model.train()

    bar = tqdm(total=options.steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    window = options.seq_len + 1
    wall_start = time.perf_counter() - (log[-1]["elapsed_s"] if log else 0.0)
    last = options.steps if stop_after is None else min(stop_after, options.steps)
    while step < last:
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = options.lr_at(step)
        batch = sample_windows(train_stream, options.batch_size, window, options.seed, step)
        main, mtp = batch_losses(model, batch)
        (main + options.mtp_weight * mtp).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        imbalance = routers.balance(options.balance_rate)
        step += 1
        seconds = time.perf_counter() - started
        entry = {"step": step, "loss": round(main.item(), 4), "mtp_loss": round(mtp.item(), 4),
                 "lr": options.lr_at(step - 1), "grad_norm": round(float(grad_norm), 3),
                 "max_load": round(imbalance, 2), "tokens_per_s": round(batch.numel() / seconds),
                 "elapsed_s": round(time.perf_counter() - wall_start, 1)}
        if step % eval_every == 0 or step == options.steps:
            model.eval()
            entry["heldout_loss"] = round(heldout_loss(model, heldout_stream, window), 4)
            model.train()
        log.append(entry)
        bar.update(1)
        bar.set_postfix(loss=entry["loss"], mtp=entry["mtp_loss"], tok_s=entry["tokens_per_s"],
                        **({"heldout": entry["heldout_loss"]} if "heldout_loss" in entry else {}))
        if step % checkpoint_every == 0 or step == last:
            save_state(workdir, model, optimizer, step, options, log)
    bar.close()
    model.eval()
    if step == options.steps:
        export_model(model, folder)
    return model


def main(argv: list[str] | None = None) -> None:
    defaults = TrainOptions()
    parser = argparse.ArgumentParser(description="Train the built-in tiny Nemotron 3 on the Python stdlib (CPU).")
    parser.add_argument("--workdir", type=Path, required=True, help="folder for the run (resumed if it holds one)")
    for f in dataclasses.fields(TrainOptions):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                            default=getattr(defaults, f.name))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--no-progress", action="store_true")
    args = vars(parser.parse_args(argv))
    torch.set_num_threads(args.pop("threads"))
    workdir, every, eval_every = args.pop("workdir"), args.pop("checkpoint_every"), args.pop("eval_every")
    progress = not args.pop("no_progress")
    train(workdir, TrainOptions(**args), every, eval_every, progress)
    print(f"{workdir / MODEL_FOLDER}: model.safetensors written")


if __name__ == "__main__":
    main()
