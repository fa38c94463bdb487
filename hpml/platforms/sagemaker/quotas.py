"""What the account's SageMaker quotas allow a study: how many of its jobs may run at once, and whether their
instances may be kept warm for the next job (SageMaker managed warm pools).

Service Quotas names SageMaker's training quotas "<instance type> for training job usage" (instances running training
jobs at once) and "<instance type> for training warm pool usage" (instances kept warm; 0 unless the account asked for
more); jobs.account_quotas reads them. Warm pools are for on-demand jobs: managed spot training cannot keep its
instances. No AWS calls here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

TRAINING, WARM_POOL = "{} for training job usage", "{} for training warm pool usage"


def jobs_allowed(quotas: dict[str, float] | None, setups: Iterable[tuple[str, int]]) -> int | None:
    """How many jobs of these (instance type, count) setups may run at once: the fewest any one setup's quota allows
    (at least 1); None when a quota is not known."""
    allowed = []
    for instance_type, count in setups:
        value = (quotas or {}).get(TRAINING.format(instance_type))
        if value is None:
            return None
        allowed.append(int(value // count))
    return max(1, min(allowed)) if allowed else None


def warm_pool_refusal(spot: bool, keep_alive: int, quotas: dict[str, float] | None,
                      setup: tuple[str, int]) -> str | None:
    """Why the jobs of this setup cannot keep their instances warm, or None when they can (as far as is known)."""
    instance_type, count = setup
    if spot:
        return "managed spot training cannot keep instances warm"
    if not keep_alive:
        return "--keep-alive 0"
    allowed = (quotas or {}).get(WARM_POOL.format(instance_type))
    if allowed is not None and allowed < count:
        return (f"the account's quota '{WARM_POOL.format(instance_type)}' is {allowed:g}, fewer than {count}; ask "
                "for more in the Service Quotas console")
    return None


@dataclass(frozen=True)
class Allowance:
    """What a study's new jobs may do: how many run at once, and which instance setups keep instances warm for the
    next job; each with a line saying why."""

    max_jobs: int
    max_jobs_note: str
    warm_setups: set[tuple[str, int]]
    warm_note: str | None

    @classmethod
    def of(cls, setups: list[tuple[str, int]], max_jobs: int | None, spot: bool, keep_alive: int,
           quotas: dict[str, float] | None, quota_note: str) -> Allowance:
        """From --max-jobs (None: the quotas decide), --spot, --keep-alive and the account's quotas (None: not known,
        `quota_note` says why)."""
        allowed = jobs_allowed(quotas, setups)
        if max_jobs:
            max_jobs_note = "--max-jobs"
        elif allowed:
            max_jobs_note = f"as {quota_note} allow"
        else:
            unnamed = "" if quotas is None else " name none of these instance types"
            max_jobs_note = f"as no quota is known ({quota_note}{unnamed}): set --max-jobs to what the account allows"
        refusals = {setup: warm_pool_refusal(spot, keep_alive, quotas, setup) for setup in setups}
        warm_setups = {setup for setup, refusal in refusals.items() if refusal is None}
        refused: dict[str, list[str]] = {}
        for (kind, count), refusal in refusals.items():
            if refusal:
                refused.setdefault(refusal, []).append(f"{kind} × {count}")
        notes = [f"{', '.join(names)}: {refusal}" for refusal, names in refused.items()]
        if quotas is None and warm_setups:
            notes.append(f"whether the account allows them is not known ({quota_note}): SageMaker keeps instances "
                         f"warm only within its quota '{WARM_POOL.format('<instance type>')}', 0 unless raised")
        return cls(max_jobs or allowed or 1, max_jobs_note, warm_setups, "; ".join(notes) or None)
