"""hpml: how much faster data-parallel training makes a CIFAR-10 CNN, and what it costs in accuracy.

The Python API (hpml/api.py): `run_training`, `run_study`, `plan_study`, `load_results`, `summary_table` and `Study`,
loaded on first use so that `import hpml.<module>` stays light (the client needs no torch).
"""

__version__ = "0.1.0"
API = ("run_training", "run_study", "plan_study", "load_results", "summary_table", "Study")


def __getattr__(name: str) -> object:
    if name in API:
        from hpml import api

        return getattr(api, name)
    raise AttributeError(f"module 'hpml' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API])
