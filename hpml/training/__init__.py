"""The training layer (torch): the loop, the speed settings and loaders, the process group, checkpoints and
the profiler. Everything here runs where training runs: a GPU node, a SageMaker job, a CPU."""
