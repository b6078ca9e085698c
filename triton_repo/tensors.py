"""The tensors of nemo3's Triton models: names, Triton data types, shapes.

The text-level names and types are TensorRT-LLM's (its `inflight_batcher_llm/ensemble` model), so
clients written for TensorRT-LLM's Triton repositories talk to nemo3's unchanged. Every model has
`max_batch_size: 0`, so the dims below are the full request shapes: `[1]` for a scalar.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton's DataType enum name, e.g. "TYPE_INT32"
    dims: tuple[int, ...] = (1,)
    optional: bool = False


# What every nemo3 repository's `ensemble` model takes: TensorRT-LLM's text-level inputs.
TEXT_INPUTS = (
    TensorSpec("text_input", "TYPE_STRING"),
    TensorSpec("max_tokens", "TYPE_INT32"),
    TensorSpec("stream", "TYPE_BOOL", optional=True),
    TensorSpec("temperature", "TYPE_FP32", optional=True),
    TensorSpec("top_k", "TYPE_INT32", optional=True),
    TensorSpec("top_p", "TYPE_FP32", optional=True),
    TensorSpec("seed", "TYPE_UINT64", optional=True),
    TensorSpec("stop_words", "TYPE_STRING", (-1,), optional=True),
    TensorSpec("exclude_input_in_output", "TYPE_BOOL", optional=True),
)
TEXT_OUTPUT = TensorSpec("text_output", "TYPE_STRING", (-1,))

# Served by the nemo3 runtime only. min_tokens is TensorRT-LLM's (inflight_batcher_llm/ensemble: TYPE_INT32 [1],
# optional), but its LLM-API model (the trtllm target) reads no such input (helpers.py,
# get_sampling_params_from_request), so that target's ensemble does not declare it and Triton refuses the input
# there rather than dropping it. genai-perf's `min_length` is in neither TensorRT-LLM ensemble and is not accepted.
NEMO3_INPUTS = TEXT_INPUTS + (
    TensorSpec("min_tokens", "TYPE_INT32", optional=True),  # no EOS, stop token or stop string before this many
    TensorSpec("think_budget", "TYPE_INT32", optional=True),  # max tokens inside <think> ... </think>
    TensorSpec("num_speculative_tokens", "TYPE_INT32", optional=True),  # MTP draft length, 0: off
)
NEMO3_OUTPUTS = (
    TEXT_OUTPUT,
    TensorSpec("finish_reason", "TYPE_STRING"),  # "" until the last response: stop, length, cancelled
    TensorSpec("num_input_tokens", "TYPE_INT32"),  # TensorRT-LLM's names for the token counts; 0 until the last
    TensorSpec("num_output_tokens", "TYPE_INT32"),  # generated so far
    TensorSpec("acceptance_length", "TYPE_FP32"),  # tokens per MTP verify step; 0 without speculation
)

# TensorRT-LLM's LLM-API Python model (triton_backend/all_models/llmapi/tensorrt_llm): the inputs
# its model.py reads, keyed by the text-level name the ensemble maps onto them.
LLMAPI_INPUTS = {
    "text_input": TensorSpec("text_input", "TYPE_STRING", (-1,)),
    "stream": TensorSpec("streaming", "TYPE_BOOL", optional=True),
    "max_tokens": TensorSpec("sampling_param_max_tokens", "TYPE_INT32", optional=True),
    "temperature": TensorSpec("sampling_param_temperature", "TYPE_FP32", optional=True),
    "top_k": TensorSpec("sampling_param_top_k", "TYPE_INT32", optional=True),
    "top_p": TensorSpec("sampling_param_top_p", "TYPE_FP32", optional=True),
    "seed": TensorSpec("sampling_param_seed", "TYPE_UINT64", optional=True),
    "stop_words": TensorSpec("sampling_param_stop", "TYPE_STRING", (-1,), optional=True),
    "exclude_input_in_output": TensorSpec("sampling_param_exclude_input_from_output", "TYPE_BOOL", optional=True),
}
LLMAPI_EXTRA_INPUTS = (
    TensorSpec("return_finish_reason", "TYPE_BOOL", optional=True),
    TensorSpec("stop", "TYPE_BOOL", optional=True),  # a request that stops the request with the same id
)
LLMAPI_OUTPUTS = (
    TEXT_OUTPUT,
    TensorSpec("finish_reason", "TYPE_STRING", (-1,)),  # only when return_finish_reason is set
)
