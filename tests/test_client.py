"""The gRPC client against the generated repository served in-process: tritonclient -> KServe v2 gRPC
development server -> ensemble -> nemo3's model.py (under the python-backend shim) -> an engine.

The engine here is a small, real implementation of `serving_api.Server` (it streams the prompt's
words in reverse order, one per step, with a delay), not the nemo3 runtime: the end-to-end test
"streamed text equals the runtime's own greedy output" waits for the runtime's engine factory.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
from click.testing import CliRunner

from nemo3.cli.main import main as cli
from nemo3.engines.runtime.requests import Delta, FinishReason
from nemo3.triton_repo.client import (Generation, ModelNotReady, RequestFailed, RequestOptions, RequestTimeout, ServerUnavailable,
                                      TextClient)
from nemo3.triton_repo.generate import RepositoryOptions, write_repository
from nemo3.triton_repo.dev_server import DevServer
from nemo3.triton_repo.serving_api import Server

STEP_S = 0.01
ENGINES: list["ReverseEngine"] = []


class ReverseEngine:
    """Streams the prompt's words last to first, one word per step (token id = word length)."""

    def __init__(self, build_dir, device, tp):
        self.build_dir, self.device, self.tp = build_dir, device, tp
        self.lock = threading.Lock()
        self.cancel_events: dict[str, threading.Event] = {}
        self.seen: dict[str, tuple] = {}  # prompt -> (request_id, params)
        self.cancelled_prompts: set[str] = set()
        self.emitted: dict[str, int] = {}  # prompt -> words sent
        self.active = self.peak = 0
        self.closed = False

    def stream(self, prompt, params, request_id):
        words = prompt.split()[::-1]
        event = threading.Event()
        with self.lock:
            self.cancel_events[request_id] = event
            self.seen[prompt] = (request_id, params)
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            sent = 0
            for word in words:
                time.sleep(STEP_S)
                if event.is_set():
                    with self.lock:
                        self.cancelled_prompts.add(prompt)
                    yield Delta(request_id, [], "", True, FinishReason.CANCELLED, self._stats(words, sent, params))
                    return
                if word in params.stop:
                    yield Delta(request_id, [], "", True, FinishReason.STOP, self._stats(words, sent, params))
                    return
                sent += 1
                self.emitted[prompt] = sent
                done = sent == len(words) or sent == params.max_tokens
                reason = None if not done else FinishReason.STOP if sent == len(words) else FinishReason.LENGTH
                yield Delta(request_id, [len(word)], (" " if sent > 1 else "") + word, done, reason,
                            self._stats(words, sent, params) if done else {})
                if done:
                    return
        finally:
            with self.lock:
                self.active -= 1
                self.cancel_events.pop(request_id, None)

    @staticmethod
    def _stats(words, sent, params):
        stats = {"input_tokens": len(words), "output_tokens": sent}
        if params.num_speculative_tokens:
            stats["acceptance_length"] = 1 + params.num_speculative_tokens / 2
        return stats

    def cancel(self, request_id):
        with self.lock:
            event = self.cancel_events.get(request_id)
        if event is None:
            return False
        event.set()
        return True

    def ready(self):
        return not self.closed

    def close(self):
        self.closed = True


def load_server(build_dir, device, tp):  # the engine factory named in the test repository's config.pbtxt
    assert build_dir.is_dir()
    engine = ReverseEngine(build_dir, device, tp)
    ENGINES.append(engine)
    return engine


def reverse(prompt: str) -> str:
    return " ".join(prompt.split()[::-1])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    (root / "build").mkdir()
    write_repository(root / "repo", RepositoryOptions(device="cpu", build_dir=str(root / "build"),
                                                      server_factory="test_client:load_server"))
    ENGINES.clear()
    with DevServer(root / "repo") as srv:
        yield srv
    assert ENGINES[-1].closed


@pytest.fixture
def engine(server):
    return ENGINES[-1]


def wait_for(condition, seconds=10.0):
    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        time.sleep(0.01)
    return condition()


def test_engine_factory_got_the_build(server, engine):
    assert isinstance(engine, Server)
    assert engine.build_dir.name == "build" and engine.device == "cpu" and engine.tp == 1


def test_streams_a_completion_end_to_end(server, engine):
    prompt = "one two three four five six"
    options = RequestOptions(max_tokens=50, min_tokens=4, temperature=0.5, top_k=3, top_p=0.9, seed=2**40 + 7,
                             think_budget=5, num_speculative_tokens=2)
    chunks = list(TextClient(server.url).stream(prompt, options))
    assert [c.text for c in chunks] == ["six", " five", " four", " three", " two", " one"]
    last = chunks[-1]
    assert last.finish_reason == "stop"
    assert (last.num_input_tokens, last.num_output_tokens, last.acceptance_length) == (6, 6, 2.0)
    assert [c.num_output_tokens for c in chunks] == [1, 2, 3, 4, 5, 6]
    _, params = engine.seen[prompt]
    assert (params.max_tokens, params.min_tokens, params.temperature, params.top_k, params.seed, params.think_budget,
            params.num_speculative_tokens) == (50, 4, 0.5, 3, 2**40 + 7, 5, 2)
    assert params.top_p == pytest.approx(0.9)


def test_one_response_stop_words_max_tokens_and_the_prompt_echo(server, engine):
    client = TextClient(server.url)
    done = client.generate("a b c d e", RequestOptions(max_tokens=3, stream=False))
    assert (done.text, done.finish_reason, done.chunks) == ("e d c", "length", 1)
    done = client.generate("p q r s", RequestOptions(max_tokens=9, stream=False, exclude_input_in_output=False))
    assert done.text == "p q r s" + "s r q p"
    done = client.generate("u v w x y", RequestOptions(stop_words=("w",)))
    assert (done.text, done.finish_reason) == ("y x", "stop")
    direct = TextClient(server.url, model="nemo3").generate("left right")
    assert direct.text == "right left"


def test_sixteen_concurrent_streams(server, engine):
    prompts = [" ".join(f"w{i}x{j}" for j in range(8)) for i in range(16)]
    engine.peak = 0
    results = TextClient(server.url).generate_many(prompts, RequestOptions(max_tokens=20), concurrency=16)
    assert [r.text for r in results] == [reverse(p) for p in prompts]
    assert all(r.chunks == 8 and r.finish_reason == "stop" for r in results)
    assert engine.peak > 1  # they were in the engine together


def test_cancel_one_stream_while_others_run(server, engine):
    long = [" ".join(f"c{i}y{j}" for j in range(150)) for i in range(4)]
    client = TextClient(server.url)
    generations = [client.stream(p, RequestOptions(max_tokens=500)) for p in long]
    victim = generations[1]
    assert [next(victim).text for _ in range(3)] == ["c1y149", " c1y148", " c1y147"]
    victim.cancel()
    assert list(victim) == []
    others = ["".join(c.text for c in g) for i, g in enumerate(generations) if i != 1]
    assert others == [reverse(p) for i, p in enumerate(long) if i != 1]
    assert wait_for(lambda: long[1] in engine.cancelled_prompts)  # the server cancelled it in the engine
    assert engine.emitted[long[1]] < 150 and not engine.cancelled_prompts & {long[0], long[2], long[3]}


def test_timeout_is_one_line_and_cancels_on_the_server(server, engine):
    prompt = " ".join(f"t{j}" for j in range(300))
    with pytest.raises(RequestTimeout, match=r"^ensemble at .*: no complete answer within the 0.3 s timeout$"):
        TextClient(server.url, timeout=0.3).generate(prompt, RequestOptions(max_tokens=500))
    assert wait_for(lambda: prompt in engine.cancelled_prompts)


def test_missing_model_and_bad_request_are_clean_errors(server):
    with pytest.raises(ModelNotReady, match=rf"^model 'nope' is not ready on {server.url}"):
        TextClient(server.url, model="nope").generate("x")
    with pytest.raises(RequestFailed, match=r"max_tokens=0: must be >= 1"):
        TextClient(server.url).generate("x", RequestOptions(max_tokens=0))
    with pytest.raises(RequestFailed, match=r"min_tokens=9: must be in \[0, max_tokens=3\]"):
        TextClient(server.url).generate("x", RequestOptions(max_tokens=3, min_tokens=9))
    inputs = TextClient(server.url)._inputs("x", RequestOptions())  # a model gone between check and request
    with pytest.raises(RequestFailed, match=r"^nope at .*: Request for unknown model: 'nope' is not found$"):
        list(Generation(server.url, "nope", inputs, timeout=5))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_not_listening_is_one_line():
    url = f"127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnavailable, match=rf"^no Triton server answers at {url} \(") as info:
        TextClient(url, connect_timeout=2).generate("x")
    assert "\n" not in str(info.value)


def test_cli_streams_and_reports_errors(server, engine):
    result = CliRunner().invoke(cli, ["client", "--url", server.url, "--stats", "--min-tokens", "2",
                                      "alpha beta gamma"])
    assert result.exit_code == 0, result.output
    assert engine.seen["alpha beta gamma"][1].min_tokens == 2
    assert result.stdout == "gamma beta alpha\n"
    assert "finish: stop, input tokens: 3, output tokens: 3" in result.stderr
    many = CliRunner().invoke(cli, ["client", "--url", server.url, "a b", "c d", "e f"])
    assert many.exit_code == 0 and many.stdout.splitlines() == ["[0] b a", "[1] d c", "[2] f e"]
    down = CliRunner().invoke(cli, ["client", "--url", f"127.0.0.1:{free_port()}", "x"])
    assert down.exit_code == 1 and down.output.startswith("Error: no Triton server answers at 127.0.0.1:")
    assert len(down.output.strip().splitlines()) == 1


def client_threads() -> int:
    """Threads of this process that are not the in-process server's (its gRPC workers, stream readers and
    model.py's request threads) nor the engines' own."""
    return sum(not t.name.startswith(("kserve", "nemo3-")) for t in threading.enumerate())


def test_no_thread_outlives_its_request(server, engine):
    """tritonclient ends a stream's request-feeding gRPC thread only when its request queue ends: finished,
    failed, timed-out and cancelled generations must all leave no thread behind."""
    client = TextClient(server.url)
    client.check()
    before = client_threads()
    client.generate_many([f"a{i} b c" for i in range(12)], RequestOptions(max_tokens=5), concurrency=6)
    for i in range(6):
        generation = client.stream(" ".join(f"k{i}z{j}" for j in range(100)), RequestOptions(max_tokens=200))
        next(generation)
        generation.cancel()
        with pytest.raises(RequestFailed):
            client.generate("x", RequestOptions(max_tokens=0))
    with pytest.raises(RequestTimeout):
        TextClient(server.url, timeout=0.2).generate(" ".join(["w"] * 100), RequestOptions(max_tokens=200))
    assert wait_for(lambda: client_threads() <= before), [t.name for t in threading.enumerate()]


def test_model_readiness_follows_the_engine(server, engine):
    assert TextClient(server.url, model="nemo3").check()
    engine.closed = True  # an engine that cannot serve any more
    try:
        with pytest.raises(ModelNotReady, match="model 'nemo3' is not ready"):
            TextClient(server.url, model="nemo3").check()
    finally:
        engine.closed = False


def test_cli_seed_out_of_range_is_one_line(server):
    result = CliRunner().invoke(cli, ["client", "--url", server.url, "--seed", "-1", "--temperature", "1", "hi"])
    assert result.exit_code == 1
    assert result.output.strip() == (f"Error: seed=-1: model 'ensemble' takes a UINT64 (0 to {2**64 - 1})")
