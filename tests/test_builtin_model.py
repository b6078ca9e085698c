"""The built-in model (export/builtin/): its files, its model card's numbers, transformers parity, training.

The held-out numbers are recomputed here and compared with the model card; they depend on the
stdlib's files, so that comparison runs only on the Python version the card names.
"""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest
import torch

from nemo3.export.tokenizer import load_tokenizer
from nemo3.engines.evaluation.greedy import greedy_text
from nemo3.engines.evaluation.heldout import HeldoutResult, evaluate_heldout, window_starts
from nemo3.engines.network.loading import load
from nemo3.export import corpus
from nemo3.export.builtin import BUILTIN_DIR, builtin_model_path
from nemo3.export.spec import ATTENTION, MAMBA, MOE, ModelSpec

CARD = BUILTIN_DIR / "README.md"
MAX_PACKAGE_BYTES = 20 * 1024 * 1024
WINDOW = 256


def card_value(label: str) -> str:
    """The value cell of the model card's table row `| label | value |`."""
    match = re.search(rf"^\| {re.escape(label)} \| ([^|]+?) \|$", CARD.read_text(), re.MULTILINE)
    assert match, f"{CARD}: no table row {label!r}"
    return match.group(1)


def card_number(label: str) -> float:
    return float(card_value(label).rstrip("%").replace(",", ""))


def card_sample() -> tuple[str, int, str]:
    """(prompt, new tokens, greedy continuation) from the card: "Greedy continuation of `PROMPT` (N new tokens)"
    followed by a ```python block holding prompt + continuation."""
    text = CARD.read_text()
    block = re.search(r"Greedy continuation of `(.+?)` \((\d+) new tokens\).*?```python\n(.*?)```", text, re.DOTALL)
    assert block, f"{CARD}: no greedy continuation sample"
    prompt, n_tokens, sample = block.group(1), int(block.group(2)), block.group(3)
    assert sample.startswith(prompt)
    return prompt, n_tokens, sample[len(prompt):].rstrip("\n")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load()


@pytest.fixture(scope="module")
def heldout(model) -> HeldoutResult:
    if card_value("corpus Python version") != f"{sys.version_info[0]}.{sys.version_info[1]}":
        pytest.skip(f"the card's held-out numbers are for Python {card_value('corpus Python version')}'s stdlib")
    return evaluate_heldout(model, load_tokenizer(BUILTIN_DIR), window=WINDOW, batch_size=16)


# ---- files and architecture -----------------------------------------------------------------------
def test_package_files_and_architecture():
    folder = builtin_model_path()
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    assert sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) <= MAX_PACKAGE_BYTES
    config = json.loads((folder / "config.json").read_text())
    assert "hybrid_override_pattern" in config and config["mtp_hybrid_override_pattern"] == "*E"
    spec = ModelSpec.from_file(folder)
    assert spec.layer_types.count(MAMBA) >= 1 and spec.layer_types.count(ATTENTION) >= 2 and MOE in spec.layer_types
    assert spec.moe_latent_size < spec.hidden_size and spec.n_group > 1 and spec.moe_shared_expert_intermediate_size
    assert spec.num_nextn_predict_layers == 1
    for tp in (2, 4):
        counts = (spec.num_attention_heads, spec.mamba_num_heads, spec.n_groups, spec.n_routed_experts, spec.n_group)
        assert all(count % tp == 0 for count in counts)


def test_parameter_count_matches_card(model):
    n = model.num_parameters()
    assert 2_000_000 <= n <= 8_000_000
    assert card_number("parameters (MTP included)") == n


def test_tokenizer_loads_in_transformers():
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(BUILTIN_DIR)
    ours = load_tokenizer(BUILTIN_DIR)
    text = "def f(x):\n    return x  # é\n"
    assert hf(text).input_ids == ours.encode(text).ids == [1] + ours.encode(text, add_special_tokens=False).ids
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    assert hf.convert_tokens_to_ids(["<think>", "</think>"]) == [3, 4]
    assert 4096 <= hf.vocab_size <= 8192 and hf.decode(hf(text).input_ids, skip_special_tokens=True) == text


# ---- the model card's claims --------------------------------------------------------------------------
@pytest.mark.slow  # the whole held-out set: ~150k tokens through the network
def test_heldout_numbers_match_card(heldout):
    assert heldout.files == card_number("held-out files")
    assert heldout.tokens == card_number("held-out tokens scored")
    assert heldout.loss == pytest.approx(card_number("cross-entropy (nats/token)"), abs=2e-3)
    assert heldout.perplexity == pytest.approx(card_number("perplexity"), rel=2e-3)
    assert heldout.bits_per_byte == pytest.approx(card_number("bits per byte"), abs=2e-3)
    assert heldout.unigram_loss == pytest.approx(card_number("unigram cross-entropy (nats/token)"), abs=1e-3)
    assert 100 * heldout.mtp_agreement == pytest.approx(card_number("MTP draft top-1 agreement"), abs=0.2)


@pytest.mark.slow
def test_model_beats_unigram_and_mtp_drafts_agree(heldout):
    assert heldout.loss <= 0.6 * heldout.unigram_loss
    assert heldout.mtp_agreement >= 0.35


def test_greedy_sample_matches_card(model):
    prompt, n_tokens, sample = card_sample()
    assert greedy_text(model, load_tokenizer(BUILTIN_DIR), prompt, n_tokens) == sample
    compile(prompt + sample + "\n", "<sample>", "exec")  # reads like Python: it even compiles


def test_transformers_gives_the_same_logits(model):
    from transformers import NemotronHForCausalLM

    hf = NemotronHForCausalLM.from_pretrained(BUILTIN_DIR, dtype=torch.float32).eval()
    for layer in hf.model.layers:  # transformers 5.14 mis-sums across SSD chunks (see test_network.py)
        if hasattr(layer.mixer, "chunk_size"):
            layer.mixer.chunk_size = WINDOW
    tokenizer = load_tokenizer(BUILTIN_DIR)
    text = corpus.split("heldout")[0].text()
    ids = torch.tensor([[1] + tokenizer.encode(text, add_special_tokens=False).ids[:WINDOW - 1]])
    with torch.no_grad():
        want = hf(ids, use_cache=False).logits
        got = model.logits(ids)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-4
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.99


# ---- corpus, evaluation windows, training --------------------------------------------------------------
def test_corpus_split_is_deterministic_and_disjoint():
    files = corpus.stdlib_files()
    train, heldout = corpus.split("train"), corpus.split("heldout")
    assert {f.relative for f in train}.isdisjoint(f.relative for f in heldout)
    assert len(train) + len(heldout) == len(files) and 0.02 < len(heldout) / len(files) < 0.1
    assert corpus.SourceFile("json/decoder.py", files[0].path).held_out == \
        corpus.SourceFile("json/decoder.py", files[-1].path).held_out  # the path alone decides
    for f in files:
        parts = f.relative.split("/")
        assert not {"test", "tests", "idlelib", "site-packages"} & set(parts[:-1])
        assert not f.relative.startswith("encodings/cp1252") and f.relative != "pydoc_data/topics.py"


def test_windows_predict_every_token_once():
    for n, window in ((1000, 256), (256, 256), (257, 256), (10, 3)):
        predicted = []
        for start in window_starts(n, window):
            predicted += range(start + 1, min(start + window, n))
        assert predicted == list(range(1, n))


def test_training_resumes_exactly(tmp_path):
    """Two steps, stop, two more == four steps straight (batches are drawn from (seed, step))."""
    from nemo3.engines.training import MODEL_FOLDER, TOKENS, TrainOptions, train

    options = TrainOptions(steps=4, batch_size=2, seq_len=16, warmup=2)
    runs = {}
    for name, stops in (("straight", [None]), ("resumed", [2, None])):
        work = tmp_path / name
        (work / MODEL_FOLDER).mkdir(parents=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(BUILTIN_DIR / f, work / MODEL_FOLDER / f)
        if name == "resumed":  # the corpus tokenized by the first run
            shutil.copy(tmp_path / "straight" / TOKENS, work / TOKENS)
        for stop in stops:
            model = train(work, options, checkpoint_every=3, eval_every=100, progress=False, stop_after=stop)
        runs[name] = model.state_dict()
        assert json.loads((work / "train_state.json").read_text())["step"] == 4
        assert (work / MODEL_FOLDER / "model.safetensors").exists()
    for name, tensor in runs["straight"].items():
        assert torch.equal(tensor, runs["resumed"][name]), name
