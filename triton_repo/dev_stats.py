"""Per-model inference statistics of the development server, in Triton's `ModelStatistics` message.

Counted where Triton counts them (triton-inference-server/core):
- a request that fails the input checks is refused before it reaches the model and counts nowhere
  (src/tritonserver.cc, TRITONSERVER_ServerInferAsync returns PrepareForInference's error first);
- a completed request adds one `success` (or one `fail`) with its duration (src/infer_request.cc,
  InferenceRequest::ReportStatistics); a success also adds one to `inference_count` (its batch size,
  1 with max_batch_size 0) and one execution (one request per execute() here);
- an ensemble counts itself once per request and its steps count their own requests
  (src/ensemble_scheduler/ensemble_scheduler.cc, RequestTracker::DecrementCounter).
Requests are not queued here (`queue`: 0 ns) and input and output handling are not timed apart from
the model: `compute_infer` is the whole request, `compute_input` / `compute_output` count the same
requests with 0 ns (perf_analyzer requires the three compute counts to agree).
"""

from __future__ import annotations

import threading
import time


class ModelStats:
    def __init__(self):
        self._lock = threading.Lock()
        self.success = [0, 0]  # count, ns
        self.fail = [0, 0]
        self.last_inference_ms = 0

    def record(self, ok: bool, start_ns: int, end_ns: int) -> None:
        """One finished request, from its arrival to its final response (`time.monotonic_ns()`)."""
        with self._lock:
            total = self.success if ok else self.fail
            total[0] += 1
            total[1] += end_ns - start_ns
            self.last_inference_ms = time.time_ns() // 1_000_000

    def message(self, name: str):
        from tritonclient.grpc import service_pb2 as pb

        with self._lock:
            n = self.success[0]
            stats = pb.InferStatistics(
                success=pb.StatisticDuration(count=n, ns=self.success[1]),
                fail=pb.StatisticDuration(count=self.fail[0], ns=self.fail[1]),
                queue=pb.StatisticDuration(count=n, ns=0),
                compute_input=pb.StatisticDuration(count=n, ns=0),
                compute_infer=pb.StatisticDuration(count=n, ns=self.success[1]),
                compute_output=pb.StatisticDuration(count=n, ns=0))
            return pb.ModelStatistics(name=name, version="1", last_inference=self.last_inference_ms,
                                      inference_count=n, execution_count=n, inference_stats=stats)
