"""KServe v2 tensors on the wire <-> numpy arrays, for the development server (dev_server.py)."""

from __future__ import annotations

import numpy as np


def wire_type(data_type: int) -> str:
    """Triton config DataType -> KServe datatype ("TYPE_STRING" -> "BYTES", "TYPE_FP32" -> "FP32")."""
    from tritonclient.grpc import model_config_pb2 as mc

    name = mc.DataType.Name(data_type).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def decode(tensor, raw: bytes | None) -> np.ndarray:
    """One request input (`InferInputTensor`) as an array, from its raw bytes or its typed contents."""
    from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

    shape = list(tensor.shape)
    if tensor.datatype == "BYTES":
        values = deserialize_bytes_tensor(raw) if raw is not None else np.array(tensor.contents.bytes_contents,
                                                                                dtype=np.object_)
        return values.reshape(shape)
    dtype = triton_to_np_dtype(tensor.datatype)
    if raw is not None:
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    contents = tensor.contents
    field_ = {"BOOL": "bool_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents",
              "UINT64": "uint64_contents", "UINT32": "uint_contents"}.get(tensor.datatype, "int_contents")
    return np.array(getattr(contents, field_), dtype=dtype).reshape(shape)


def encode(array: np.ndarray) -> tuple[str, bytes]:
    """(KServe datatype, raw bytes) of an output array."""
    from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor

    array = np.asarray(array)
    if array.dtype == np.object_ or array.dtype.kind in "SU":
        return "BYTES", serialize_byte_tensor(array.astype(np.object_)).item()
    return np_to_triton_dtype(array.dtype), np.ascontiguousarray(array).tobytes()


def infer_response(model_name: str, request_id: str, outputs: dict[str, np.ndarray], requested: set[str]):
    """A `ModelInferResponse` carrying `outputs` (only the `requested` ones, all if empty) as raw contents."""
    from tritonclient.grpc import service_pb2

    response = service_pb2.ModelInferResponse(model_name=model_name, model_version="1", id=request_id)
    for name, array in outputs.items():
        if requested and name not in requested:
            continue
        datatype, data = encode(array)
        response.outputs.add(name=name, datatype=datatype, shape=list(np.shape(array)))
        response.raw_output_contents.append(data)
    return response
