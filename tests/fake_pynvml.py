"""A stand-in for pynvml with two GPUs, so the GPU code path runs on a machine without one. The second
GPU cannot report power (NVML's NotSupported), as some boards cannot. Utilization rises by 10 per reading.

Loaded as `pynvml` by the tests (in this process, or first on PYTHONPATH of a subprocess); never imported as
tests.fake_pynvml.
"""

import itertools

NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_SM = 1
GIB = 2**30


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    def __str__(self):
        return "Not Supported"


class _Reading:
    def __init__(self, **fields):
        self.__dict__.update(fields)


_GPUS = [
    {"name": "Fake GPU 80GB", "uuid": "GPU-aaaa1111", "total": 80 * GIB, "used": 10 * GIB, "power": 300500},
    {"name": b"Fake GPU 16GB", "uuid": "GPU-bbbb2222", "total": 16 * GIB, "used": 2 * GIB, "power": None},
]
_ticks = itertools.count()
initialised = 0


def nvmlInit():
    global initialised
    initialised += 1


def nvmlShutdown():
    global initialised
    initialised -= 1


def nvmlDeviceGetCount():
    return len(_GPUS)


def nvmlDeviceGetHandleByIndex(index):
    if not 0 <= index < len(_GPUS):
        raise NVMLError("Invalid Argument")
    return index


def nvmlDeviceGetIndex(handle):
    return handle


def nvmlDeviceGetUUID(handle):
    return _GPUS[handle]["uuid"]


def nvmlDeviceGetName(handle):
    return _GPUS[handle]["name"]


def nvmlDeviceGetUtilizationRates(handle):
    return _Reading(gpu=(10 * next(_ticks)) % 101, memory=5)


def nvmlDeviceGetMemoryInfo(handle):
    gpu = _GPUS[handle]
    return _Reading(used=gpu["used"], total=gpu["total"], free=gpu["total"] - gpu["used"])


def nvmlDeviceGetPowerUsage(handle):
    if _GPUS[handle]["power"] is None:
        raise NVMLError_NotSupported()
    return _GPUS[handle]["power"]


def nvmlDeviceGetTemperature(handle, sensor):
    return 60 + handle


def nvmlDeviceGetClockInfo(handle, clock):
    return 1980
