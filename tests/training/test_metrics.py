"""train.epoch_metrics over a world of two ranks, simulated by two threads that exchange their numbers."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from hpml.training.dist import World
from hpml.training.loop import epoch_metrics


class Exchange:
    """What two ranks' all-reduces meet in: each puts its values in, both take the reduction out."""

    def __init__(self) -> None:
        self.slots: list[list[float]] = [[], []]
        self.barrier = threading.Barrier(2, timeout=10)

    def all_reduce(self, rank: int, values: list[float], op: str) -> list[float]:
        self.slots[rank] = list(values)
        self.barrier.wait()
        reduce = sum if op == "sum" else max
        reduced = [float(reduce(column)) for column in zip(*self.slots, strict=True)]
        self.barrier.wait()  # both have read the slots before either writes its next values
        return reduced


class ThreadRank(World):
    """One rank of a world of two whose collectives are an Exchange with the other thread."""

    def __init__(self, rank: int, exchange: Exchange) -> None:
        super().__init__(rank=rank, local_rank=rank, size=2, nodes=1, backend="threads", device=torch.device("cpu"))
        self.exchange = exchange

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        return self.exchange.all_reduce(self.rank, values, op)


# Rank 0 waits long for data, rank 1 computes long: the slowest compute (5.5 s) is not the longest epoch (6 s) less
# the longest wait (4.5 s). Rank 0's test accuracy is 1/5, rank 1's 4/5, the whole test set's 5/10.
RANKS = [
    {"train": {"loss_sum": 10.0, "correct": 3, "images": 10, "epoch_time_s": 5.0, "data_time_s": 4.5},
     "test": {"loss_sum": 4.0, "correct": 1, "images": 5}, "eval_time": 1.0},
    {"train": {"loss_sum": 30.0, "correct": 9, "images": 20, "epoch_time_s": 6.0, "data_time_s": 0.5},
     "test": {"loss_sum": 6.0, "correct": 4, "images": 5}, "eval_time": 2.0},
]


@pytest.fixture  # per test, a few milliseconds: a mutation tool then knows which tests call epoch_metrics
def metrics() -> list[dict]:
    """Each rank's epoch_metrics of RANKS."""
    exchange = Exchange()
    with ThreadPoolExecutor(2) as pool:
        ranks = [pool.submit(epoch_metrics, 3, 0.1, numbers["train"], numbers["test"], numbers["eval_time"],
                             ThreadRank(rank, exchange)) for rank, numbers in enumerate(RANKS)]
        return [rank.result() for rank in ranks]


def test_every_rank_gets_the_same_metrics(metrics):
    assert metrics[0] == metrics[1]


def test_counts_are_summed_over_the_ranks(metrics):
    assert metrics[0]["train_loss"] == pytest.approx(40 / 30) and metrics[0]["train_acc"] == pytest.approx(12 / 30)
    assert metrics[0]["test_loss"] == pytest.approx(1.0) and metrics[0]["test_acc"] == pytest.approx(0.5)
    assert metrics[0]["train_images"] == 30 and metrics[0]["test_images"] == 10


def test_times_are_the_slowest_ranks(metrics):
    assert metrics[0]["epoch_time_s"] == 6.0 and metrics[0]["data_time_s"] == 4.5 and metrics[0]["eval_time_s"] == 2.0
    assert metrics[0]["images_per_s"] == pytest.approx(30 / 6.0)
    assert metrics[0]["epoch"] == 3 and metrics[0]["lr"] == 0.1


def test_compute_time_is_the_longest_of_each_ranks_own(metrics):
    assert metrics[0]["compute_time_s"] == pytest.approx(5.5)  # rank 1's 6 - 0.5; not 6 - 4.5 from two ranks


def test_a_world_of_one_reports_its_own_numbers():
    numbers = RANKS[0]
    alone = World(rank=0, local_rank=0, size=1, nodes=1, backend=None, device=torch.device("cpu"))
    metrics = epoch_metrics(1, 0.1, numbers["train"], numbers["test"], numbers["eval_time"], alone)
    assert metrics["test_acc"] == pytest.approx(0.2) and metrics["compute_time_s"] == pytest.approx(0.5)
    assert metrics["epoch_time_s"] == 5.0 and metrics["images_per_s"] == pytest.approx(2.0)
