"""A model of data-parallel scaling: a step's compute plus the ring all-reduce of its gradients.

Each rank keeps its batch (weak scaling). A ring all-reduce of S bytes over n ranks sends 2(n-1)/n x S bytes over
every link, in 2(n-1) rounds: time = 2(n-1) x latency + 2(n-1)/n x S / bandwidth, with `bandwidth` the bus
bandwidth bench/allreduce.py reports (busbw). DDP sends buckets while the backward pass still runs; with overlap,
only the communication that outlasts the backward pass adds to the step. Imports no torch.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

BACKWARD_SHARE = 2 / 3  # assumed: the backward pass is two thirds of a step (twice the forward's work)


@dataclass(frozen=True)
class Link:
    """What one all-reduce costs on an interconnect: per-round latency and bus bandwidth, and where they come from."""

    latency_s: float
    bandwidth_bytes_per_s: float
    source: str

    def allreduce_s(self, size_bytes: float, ranks: int) -> float:
        if ranks <= 1:
            return 0.0
        return 2 * (ranks - 1) * self.latency_s + 2 * (ranks - 1) / ranks * size_bytes / self.bandwidth_bytes_per_s


def fit_link(rows: list[dict], ranks: int, source: str, points: int = 3) -> Link:
    """A Link from bench/allreduce.py's table for `ranks` ranks: latency from its smallest messages, bus
    bandwidth from its largest (medians of `points` sizes each)."""
    ordered = sorted(rows, key=lambda row: row["bytes"])
    latency = statistics.median(row["time_us"] for row in ordered[:points]) * 1e-6 / (2 * (ranks - 1))
    bandwidth = statistics.median(row["busbw_gbps"] for row in ordered[-points:]) * 1e9
    return Link(latency, bandwidth, source)


def exposed_s(compute_s: float, communication_s: float, overlap: bool) -> float:
    """The communication a step waits for: all of it, or with overlap what outlasts the backward pass."""
    hidden = BACKWARD_SHARE * compute_s if overlap else 0.0
    return max(0.0, communication_s - hidden)


def step_s(compute_s: float, gradient_bytes: float, ranks: int, link: Link, overlap: bool) -> float:
    """Predicted time of one step on each of `ranks` ranks."""
    return compute_s + exposed_s(compute_s, link.allreduce_s(gradient_bytes, ranks), overlap)


def speedup(compute_s: float, gradient_bytes: float, ranks: int, link: Link, overlap: bool) -> float:
    """Images per second of `ranks` ranks over one device's, each rank with the same batch."""
    return ranks * compute_s / step_s(compute_s, gradient_bytes, ranks, link, overlap)
