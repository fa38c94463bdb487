"""Where a profiled training step's time goes, read from a Chrome trace of torch.profiler: no torch needed.

The steps are the profiler's ProfilerStep#N spans on the training thread. Gradient communication is, on a CPU,
gloo's work on its own threads (gloo:all_reduce, gloo:broadcast) and the training thread's part in it: the c10d::
operators that start a collective or wait for one, and DDP's reducer work (copies between gradients and buckets,
the division by the world size). On a GPU it is NCCL's kernels. It is exposed where no computation covers it: on a
CPU, where the training thread runs no operator but those (it waits, or does communication's own work); on a GPU,
where no other kernel or copy runs. The
optimizer is its Optimizer.step and Optimizer.zero_grad spans (on the GPU where the trace has them there), data the
DATA_SPAN around each wait for a batch, and forward+backward the rest of the step.
"""

from __future__ import annotations

from collections.abc import Iterable

DATA_SPAN = "hpml:data"
STEP_PREFIX = "ProfilerStep#"
OPTIMIZER_PREFIXES = ("Optimizer.step#", "Optimizer.zero_grad#")
GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
PARTS = ("step_ms", "compute_ms", "optimizer_ms", "data_ms", "communication_ms", "exposed_communication_ms")

Intervals = list[tuple[float, float]]


def union(spans: Iterable[tuple[float, float]]) -> Intervals:
    """Overlapping or touching spans merged, in order."""
    merged: Intervals = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def within(spans: Intervals, start: float, end: float) -> Intervals:
    return [(max(a, start), min(b, end)) for a, b in spans if min(b, end) > max(a, start)]


def uncovered(spans: Intervals, cover: Intervals) -> Intervals:
    """The parts of merged `spans` that no span of merged `cover` overlaps."""
    left: Intervals = []
    for start, end in spans:
        at = start
        for a, b in cover:
            if b <= at or a >= end:
                continue
            if a > at:
                left.append((at, a))
            at = max(at, b)
        if at < end:
            left.append((at, end))
    return left


def length(spans: Intervals) -> float:
    return sum(end - start for start, end in spans)


def span(event: dict) -> tuple[float, float]:
    return event["ts"], event["ts"] + event["dur"]


def is_training_thread_communication(event: dict, gpu: bool, thread: object) -> bool:
    name = event["name"]
    return not gpu and event["tid"] == thread and (name.startswith("c10d::") or "reducer::" in name)


def is_communication(event: dict, gpu: bool, thread: object) -> bool:
    if gpu:
        return event.get("cat") == "kernel" and "nccl" in event["name"].lower()
    return event["name"].startswith("gloo:") or is_training_thread_communication(event, gpu, thread)


def is_operator(event: dict, gpu: bool, thread: object) -> bool:
    """Work that covers communication, once the training thread's communication is taken out of it (an operator
    may hold one: a gradient's AccumulateGrad starts its bucket's all-reduce)."""
    if gpu:
        return event.get("cat") in GPU_WORK and not is_communication(event, gpu, thread)
    return event["tid"] == thread and event.get("cat") == "cpu_op"


def step_breakdown(trace: dict, gpu: bool) -> dict[str, float]:
    """The mean profiled step's parts in milliseconds (PARTS), from a trace's events. ValueError when the trace
    holds no profiled step."""
    events = [event for event in trace.get("traceEvents", []) if event.get("ph") == "X" and "dur" in event]
    steps = [event for event in events if event["name"].startswith(STEP_PREFIX)]
    if not steps:
        raise ValueError(f"the trace holds no {STEP_PREFIX} span: no profiled step")
    thread = steps[0]["tid"]
    communication = union(span(event) for event in events if is_communication(event, gpu, thread))
    own = union(span(event) for event in events if is_training_thread_communication(event, gpu, thread))
    computation = uncovered(union(span(event) for event in events if is_operator(event, gpu, thread)), own)
    optimizer_on_gpu = gpu and any(event.get("cat") == "gpu_user_annotation" for event in events)
    optimizer = union(span(event) for event in events if event["name"].startswith(OPTIMIZER_PREFIXES)
                      and (event.get("cat") == "gpu_user_annotation") == optimizer_on_gpu)
    data = union(span(event) for event in events if event["name"] == DATA_SPAN and event["tid"] == thread)
    totals = dict.fromkeys(PARTS, 0.0)
    for step in steps:
        start, end = span(step)
        sent = within(communication, start, end)
        parts = {"step_ms": end - start, "optimizer_ms": length(within(optimizer, start, end)),
                 "data_ms": length(within(data, start, end)), "communication_ms": length(sent),
                 "exposed_communication_ms": length(uncovered(sent, computation))}
        parts["compute_ms"] = max(0.0, parts["step_ms"] - parts["optimizer_ms"] - parts["data_ms"]
                                  - parts["exposed_communication_ms"])
        for name, microseconds in parts.items():
            totals[name] += microseconds
    return {name: total / len(steps) / 1e3 for name, total in totals.items()}


def exposed_share(breakdown: dict[str, float]) -> float:
    """The fraction of a step spent waiting for gradient communication."""
    return breakdown["exposed_communication_ms"] / breakdown["step_ms"] if breakdown["step_ms"] else 0.0
