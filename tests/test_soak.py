"""A bounded soak through the whole serving path with the real runtime: tritonclient -> the in-process KServe
server -> the generated ensemble -> model.py -> load_server -> the runtime (an MTP model, so drafting runs).

About 300 requests from 16 concurrent streams: well-formed ones, 30% cancelled mid-stream, and malformed
ones of every kind (NaN, inf, out of range, a valid number that makes sampling raise in its step, a request
too long for the engine). The server answers every request; every well-formed, uncancelled request finishes;
afterwards every slot is free and the client side holds no more threads than at the start. Then the device
"breaks" for good and the model's readiness says so."""

from __future__ import annotations

import math
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import add_missing_tensors, copy_builtin_tokenizer, hf_model, make_config, save_hf_checkpoint

from nemo3.engines.runtime.serving import MAX_FAILED_STEPS
from nemo3.export.builtin import BUILTIN_DIR
from nemo3.triton_repo.client import ModelNotReady, RequestFailed, RequestOptions, TextClient
from nemo3.triton_repo.generate import RepositoryOptions, write_repository
from nemo3.triton_repo.dev_server import DevServer

REQUESTS, STREAMS, CANCEL_SHARE = 300, 16, 0.3
# malformed options -> what the one-line error must name
MALFORMED = [
    (dict(temperature=math.nan), "temperature=nan"), (dict(temperature=math.inf), "temperature=inf"),
    (dict(temperature=-1.0), "temperature=-1.0"), (dict(top_p=math.nan), "top_p=nan"),
    (dict(top_p=-math.inf), "top_p=-inf"), (dict(top_p=0.0), "top_p=0"), (dict(top_p=2.0), "top_p=2.0"),
    (dict(top_k=-4), "top_k=-4"), (dict(max_tokens=0), "max_tokens=0"), (dict(max_tokens=-7), "max_tokens=-7"),
    (dict(think_budget=-1), "think_budget=-1"), (dict(num_speculative_tokens=-2), "num_speculative_tokens=-2"),
    (dict(num_speculative_tokens=10**6), "num_speculative_tokens=1000000"),
    (dict(temperature=1e-40), "RuntimeError: "),  # valid, but logits / 1e-40 overflow: sampling raises in the step
    (dict(max_tokens=10**6), "max_length"),  # can never fit the engine: refused
]


def client_threads() -> int:
    """This process's threads other than the in-process server's and the engine's."""
    return sum(not t.name.startswith(("kserve", "nemo3-")) for t in threading.enumerate())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(BUILTIN_DIR / "tokenizer.json")).get_vocab_size()
    folder = save_hf_checkpoint(hf_model(make_config("mtp", vocab_size=vocab)), tmp_path_factory.mktemp("soak"))
    add_missing_tensors(folder)
    copy_builtin_tokenizer(folder)
    repo = tmp_path_factory.mktemp("repo")
    write_repository(repo, RepositoryOptions(device="cpu", build_dir=str(folder)))
    with DevServer(repo) as srv:
        yield srv


def one_request(client: TextClient, i: int, kind: str, rng: random.Random) -> tuple[str, str]:
    """(kind, outcome) of request i: "finished <reason>", "cancelled", or "failed <message>"."""
    prompt = f"def f{i}(x):\n    return x * {i}\n"
    try:
        if kind == "cancel":
            with client.stream(prompt, RequestOptions(max_tokens=400, temperature=0.8, seed=i)) as generation:
                next(generation)
                generation.cancel()
            return kind, "cancelled"
        fields = {"max_tokens": rng.randint(1, 8), "temperature": rng.choice([None, 0.7]), "seed": i,
                  **(MALFORMED[int(kind)][0] if kind.isdigit() else {})}
        options = RequestOptions(**fields)
        chunks = list(client.stream(prompt, options))
        return kind, f"finished {chunks[-1].finish_reason}"
    except RequestFailed as e:
        return kind, f"failed {e}"


@pytest.mark.slow
def test_soak(server):
    client = TextClient(server.url, timeout=120)
    client.check()
    engine = server.models["nemo3"].instance.engine
    before = client_threads()
    rng = random.Random(0)
    kinds = [str(i % len(MALFORMED)) for i in range(REQUESTS // 5)]  # 20% malformed, each kind 4 times
    kinds += ["cancel"] * int(REQUESTS * CANCEL_SHARE)
    kinds += ["good"] * (REQUESTS - len(kinds))
    rng.shuffle(kinds)
    with ThreadPoolExecutor(STREAMS) as pool:
        outcomes = list(pool.map(lambda ik: one_request(client, ik[0], ik[1], random.Random(ik[0])),
                                 enumerate(kinds)))

    assert len(outcomes) == REQUESTS  # the server answered every request
    for kind, outcome in outcomes:
        if kind == "good":
            assert outcome in ("finished length", "finished stop"), outcome
        elif kind == "cancel":
            assert outcome == "cancelled"
        else:
            assert outcome.startswith("failed ") and MALFORMED[int(kind)][1] in outcome, (kind, outcome)
            assert "\n" not in outcome
    slots = engine.engine.slots
    assert wait_until(lambda: slots.in_use == 0 and not engine.engine.has_work()), slots.in_use
    assert wait_until(lambda: client_threads() <= before), [t.name for t in threading.enumerate()]
    assert client.generate("x = 1\n", RequestOptions(max_tokens=4)).finish_reason == "length"  # still serving

    def broken_forward(batch):  # the device is gone: every step fails, the model turns not ready
        raise RuntimeError("CUDA error: device lost")

    engine.engine.executor.forward = broken_forward
    for _ in range(MAX_FAILED_STEPS):
        with pytest.raises(RequestFailed, match="RuntimeError: CUDA error: device lost"):
            client.generate("y = 2\n", RequestOptions(max_tokens=4))
    with pytest.raises(ModelNotReady):
        TextClient(server.url, model="nemo3").check()
    assert slots.in_use == 0


def wait_until(condition, seconds: float = 30.0) -> bool:
    done = threading.Event()
    for _ in range(int(seconds / 0.05)):
        if condition():
            return True
        done.wait(0.05)
    return condition()
