"""What SageMaker training costs: on-demand prices per instance type, and a job's bill from its description.

Source: the Amazon SageMaker AI pricing page, https://aws.amazon.com/sagemaker/ai/pricing/, section On-Demand
Pricing, tab Training, region US East (N. Virginia), USD per instance-hour, as the page listed them in 2024.
Date: the table was written on 2026-11-25 by a session without web access, from those 2024 figures, and was not
checked against the page that day. AWS changes these prices (in 2025 it announced cuts for P4 and P5 GPU
instances), and other regions differ, so check the page and update the table before quoting a cost. An instance
type that is not in the table gets no cost at all, never a guessed one.
"""

from __future__ import annotations

from datetime import datetime

PRICE_SOURCE = ("Amazon SageMaker AI pricing, On-Demand, Training, US East (N. Virginia), as listed in 2024 "
                "(https://aws.amazon.com/sagemaker/ai/pricing/)")

ON_DEMAND_USD_PER_HOUR = {
    "ml.m5.xlarge": 0.23,
    "ml.m5.4xlarge": 0.922,
    "ml.c5.xlarge": 0.204,
    "ml.c5.4xlarge": 0.816,
    "ml.g4dn.xlarge": 0.736,
    "ml.g4dn.12xlarge": 4.89,
    "ml.g5.xlarge": 1.408,
    "ml.g5.12xlarge": 7.09,
    "ml.g5.48xlarge": 20.36,
    "ml.p3.2xlarge": 3.825,
    "ml.p3.8xlarge": 14.688,
    "ml.p3.16xlarge": 28.152,
    "ml.p3dn.24xlarge": 35.894,
    "ml.p4d.24xlarge": 37.688,
    "ml.p5.48xlarge": 113.07,
}


def hourly_price(instance_type: str) -> float | None:
    """On-demand USD per instance-hour, or None when the table has no price for this type."""
    return ON_DEMAND_USD_PER_HOUR.get(instance_type)


def cost_usd(billable_seconds: float, instance_count: int, usd_per_hour: float) -> float:
    """SageMaker bills each instance for the job's billable seconds: seconds × count × hourly price / 3600."""
    return billable_seconds * instance_count * usd_per_hour / 3600


def instances_cost_usd(instance_type: str, instance_count: int, seconds: float) -> float | None:
    """What `instance_count` instances of a type cost on demand for `seconds`; None when the table has no price."""
    price = hourly_price(instance_type)
    return None if price is None else cost_usd(seconds, instance_count, price)


def spot_savings_percent(training_seconds: float | None, billable_seconds: float | None) -> float | None:
    """SageMaker's own figure for managed spot training: (1 - billable / training time) × 100."""
    if not training_seconds or billable_seconds is None:
        return None
    return (1 - billable_seconds / training_seconds) * 100


def job_bill(description: dict, now: datetime | None = None) -> dict:
    """Time and cost of one training job from its DescribeTrainingJob (or Search) fields.

    A finished job has `billable_time_s`, what SageMaker bills per instance, and `cost_usd` is the real figure.
    A job still running has neither, and `estimated_cost_usd` prices the time it has run so far.
    Figures that SageMaker did not report, or an instance type with no price here, are None.
    """
    resources = description.get("ResourceConfig", {})
    instance_type, count = resources.get("InstanceType"), resources.get("InstanceCount", 1)
    price = hourly_price(instance_type) if instance_type else None
    billable = description.get("BillableTimeInSeconds")
    training = description.get("TrainingTimeInSeconds")
    started, ended = description.get("TrainingStartTime"), description.get("TrainingEndTime")
    elapsed = None
    if started and (ended or now):
        elapsed = ((ended or now) - started).total_seconds()
    running = description.get("TrainingJobStatus") == "InProgress"
    return {
        "instance_type": instance_type,
        "instance_count": count,
        "spot": bool(description.get("EnableManagedSpotTraining")),
        "training_time_s": training if training is not None else elapsed,
        "billable_time_s": billable,
        "spot_savings_percent": spot_savings_percent(training, billable),
        "price_per_instance_hour_usd": price,
        "price_source": PRICE_SOURCE if price is not None else None,
        "cost_usd": cost_usd(billable, count, price) if price is not None and billable is not None else None,
        "estimated_cost_usd": (cost_usd(elapsed, count, price)
                               if running and price is not None and elapsed is not None else None),
    }
