"""onnxruntime session options, chosen for a CPU shared with the daemon's event loop.

- intra-op threads = the CPUs this process may run on (its affinity mask, which systemd's CPUAffinity=
  or a container narrows), not the machine's core count: oversubscribing a 2-core support PC makes
  every tile slower and starves the asyncio loop that keeps MQTT and the instrument API alive.
- inter-op threads = 1 and sequential execution: a U-Net is one chain of ops; parallel branches buy
  nothing and add a second thread pool.
- spinning off: idle worker threads otherwise busy-wait for the next op, burning the cores the event
  loop and the instrument bridge need between tiles; the latency cost per op is microseconds.
- full graph optimisation: conv + activation fusion and constant folding are free speed for inference.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort  # type: ignore[import-untyped, unused-ignore]

__all__ = ["PROVIDERS", "available_cpus", "create_session", "inference_threads", "session_options"]

PROVIDERS = ["CPUExecutionProvider"]


def available_cpus() -> int:
    """CPUs this process may run on (its affinity), falling back to the core count off Linux."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def inference_threads() -> int:
    """The daemon's default: every CPU it may use but one, which stays with the event loop, the file
    writes and the journal (and, on a demo or bench PC, the simulator), so the instrument is never kept
    waiting for the daemon's answer while a slice is segmented beside it."""
    return max(1, available_cpus() - 1)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads if threads is not None else available_cpus()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only: warnings about unused initialisers flood the journal
    return opts


def create_session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), sess_options=session_options(threads), providers=PROVIDERS)
