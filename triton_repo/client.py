"""gRPC client for the text-level `ensemble` model of nemo3's Triton repositories (both targets) and
of TensorRT-LLM's: tritonclient's bidirectional stream (`start_stream` / `async_stream_infer`).

Every generation runs on its own gRPC stream, so many run concurrently (`generate_many`) and one
can be cancelled without touching the others (`Generation.cancel`: the server sees the stream
cancelled and stops the request). `timeout` bounds a whole generation (the stream's deadline).
Failures are one-line `ClientError`s: `ServerUnavailable` (nothing answers at the URL),
`ModelNotReady`, `RequestTimeout`, `RequestFailed` (the server's error message).

    client = TextClient("localhost:8001")
    for chunk in client.stream("Why is the sky blue?", RequestOptions(max_tokens=64)):
        print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

import queue
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import numpy as np


class ClientError(RuntimeError):
    """A request that could not be served; the message is one line and says why."""


class ServerUnavailable(ClientError):
    pass


class ModelNotReady(ClientError):
    pass


class RequestTimeout(ClientError):
    pass


class RequestFailed(ClientError):
    pass


@dataclass(frozen=True)
class RequestOptions:
    """What one request asks for. None: the input is not sent and the server's default applies."""

    max_tokens: int = 128
    min_tokens: int | None = None  # nemo3 targets (TensorRT-LLM's ensemble name; its LLM-API model has none)
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_words: tuple[str, ...] = ()
    exclude_input_in_output: bool | None = True
    think_budget: int | None = None  # nemo3 only
    num_speculative_tokens: int | None = None  # nemo3 only
    stream: bool = True  # False: one response with the whole text

    def inputs(self) -> dict[str, object]:
        """Triton input name -> value, for the inputs this request sends."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["stop_words"] = list(self.stop_words) or None
        return {name: value for name, value in values.items() if value is not None}


@dataclass
class Chunk:
    """One response. Counts and reasons are those of the server's outputs (None if it has none)."""

    text: str
    finish_reason: str = ""
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None
    acceptance_length: float | None = None
    final: bool = False


@dataclass
class Completion:
    prompt: str
    text: str
    finish_reason: str
    num_input_tokens: int | None
    num_output_tokens: int | None
    acceptance_length: float | None
    chunks: int  # responses received
    seconds: float


def _first_line(error) -> str:
    text = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
    return (text or type(error).__name__).strip().splitlines()[0]


class Generation:
    """The chunks of one request, read as an iterator; runs on its own gRPC stream."""

    def __init__(self, url: str, model: str, inputs: list, timeout: float | None):
        import tritonclient.grpc as grpcclient

        self.url, self.model, self.timeout = url, model, timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._queue: queue.Queue = queue.Queue()
        self._done = self._finished = False  # _finished: the server sent the final response
        self._client = grpcclient.InferenceServerClient(url)
        self._client.start_stream(callback=lambda result, error: self._queue.put((result, error)),
                                  stream_timeout=timeout)
        self._client.async_stream_infer(model, inputs, request_id=uuid.uuid4().hex, enable_empty_final_response=True)

    def __iter__(self):
        return self

    def __next__(self) -> Chunk:
        while not self._done:
            remaining = None if self._deadline is None else self._deadline - time.monotonic()
            try:
                result, error = self._queue.get(timeout=None if remaining is None else max(remaining, 0.0))
            except queue.Empty:
                self.cancel()
                raise self._timeout() from None
            if error is not None:
                self.cancel()
                if "DEADLINE_EXCEEDED" in str(getattr(error, "status", lambda: "")()) + _first_line(error):
                    raise self._timeout()
                raise RequestFailed(f"{self.model} at {self.url}: {_first_line(error)}")
            chunk = self._chunk(result)
            if chunk.final:
                self._finished = True
                self.cancel()
            if chunk.text or chunk.finish_reason or chunk.num_output_tokens is not None:
                return chunk
        raise StopIteration

    def _timeout(self) -> RequestTimeout:
        return RequestTimeout(f"{self.model} at {self.url}: no complete answer within the {self.timeout:g} s timeout")

    @staticmethod
    def _chunk(result) -> Chunk:
        def value(name, kind):
            array = result.as_numpy(name)
            if array is None or array.size == 0:
                return None
            if kind is str:
                return "".join(v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in array.reshape(-1))
            return kind(array.reshape(-1)[0])

        params = result.get_response().parameters
        reason = value("finish_reason", str) or ""
        final = params["triton_final_response"].bool_param if "triton_final_response" in params else bool(reason)
        return Chunk(value("text_output", str) or "", reason, value("num_input_tokens", int),
                     value("num_output_tokens", int), value("acceptance_length", float), final)

    def cancel(self) -> None:
        """End the stream; a request still running is cancelled on the server. No-op once finished.

        tritonclient 2.73 feeds the gRPC request stream from a queue that a gRPC thread reads until it finds
        None. `stop_stream(cancel_requests=False)` puts that None (and waits for the server to end the
        stream: at once after a final response); `cancel_requests=True` cancels the call but never puts it,
        which leaves that thread blocked for the life of the process. So a cancel mid-stream ends the
        request queue itself after cancelling."""
        if self._done:
            return
        self._done = True
        if self._finished:
            self._client.stop_stream(cancel_requests=False)
        else:
            stream = self._client._stream  # tritonclient's _InferStream, whose request queue must be ended
            self._client.stop_stream(cancel_requests=True)
            if stream is not None:
                stream._request_queue.put(None)
        self._client.close()

    def __enter__(self) -> "Generation":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()


class TextClient:
    def __init__(self, url: str = "localhost:8001", model: str = "ensemble", timeout: float | None = 300.0,
                 connect_timeout: float = 5.0):
        self.url, self.model, self.timeout, self.connect_timeout = url, model, timeout, connect_timeout
        self._datatypes: dict[str, str] | None = None

    def check(self) -> dict[str, str]:
        """Server live and model ready; returns the model's input datatypes (cached)."""
        if self._datatypes is not None:
            return self._datatypes
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        with grpcclient.InferenceServerClient(self.url) as client:
            try:
                client.is_server_live(client_timeout=self.connect_timeout)
            except InferenceServerException as e:
                raise ServerUnavailable(f"no Triton server answers at {self.url} ({_first_line(e)})") from None
            try:
                ready = client.is_model_ready(self.model, client_timeout=self.connect_timeout)
                metadata = client.get_model_metadata(self.model, client_timeout=self.connect_timeout) if ready else None
            except InferenceServerException as e:
                raise ModelNotReady(f"model {self.model!r} is not ready on {self.url} ({_first_line(e)})") from None
        if metadata is None:
            raise ModelNotReady(f"model {self.model!r} is not ready on {self.url}")
        self._datatypes = {t.name: t.datatype for t in metadata.inputs}
        return self._datatypes

    def _inputs(self, prompt: str, options: RequestOptions) -> list:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import triton_to_np_dtype

        datatypes = self.check()
        inputs = []
        for name, value in {"text_input": prompt, **options.inputs()}.items():
            if name not in datatypes:
                if name in ("text_input", "max_tokens") or value != getattr(RequestOptions, name, None):
                    raise ValueError(f"model {self.model!r} on {self.url} has no input {name!r}")
                continue  # a default the model does not take (e.g. TensorRT-LLM without nemo3's inputs)
            datatype = datatypes[name]
            values = value if isinstance(value, list) else [value]
            if datatype == "BYTES":
                array = np.array([str(v).encode("utf-8") for v in values], dtype=np.object_)
            else:
                dtype = np.dtype(triton_to_np_dtype(datatype))
                if dtype.kind in "iu":  # numpy raises a bare OverflowError for a value the type cannot hold
                    info = np.iinfo(dtype)
                    for v in values:
                        if not info.min <= v <= info.max:
                            raise ValueError(f"{name}={v}: model {self.model!r} takes a {datatype} "
                                             f"({info.min} to {info.max})")
                array = np.array(values, dtype=dtype)
            tensor = grpcclient.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs

    def stream(self, prompt: str, options: RequestOptions | None = None) -> Generation:
        """Start one request; iterate the result for its chunks."""
        return Generation(self.url, self.model, self._inputs(prompt, options or RequestOptions()), self.timeout)

    def generate(self, prompt: str, options: RequestOptions | None = None) -> Completion:
        start = time.perf_counter()
        text, last, count = [], Chunk(""), 0
        with self.stream(prompt, options) as generation:
            for chunk in generation:
                text.append(chunk.text)
                last, count = chunk, count + 1
        return Completion(prompt, "".join(text), last.finish_reason, last.num_input_tokens, last.num_output_tokens,
                          last.acceptance_length, count, time.perf_counter() - start)

    def generate_many(self, prompts: list[str], options: RequestOptions | None = None,
                      concurrency: int = 16) -> list[Completion]:
        """Run the prompts with up to `concurrency` requests in flight; results in prompt order."""
        self.check()
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            return list(pool.map(lambda p: self.generate(p, options), prompts))
