"""Running a plan: the scheduler (stages, groups between checkpoints, packages side by side),
the attempts of one package (job, environment, result, retry), the one definition of a
build's inputs, checkpoints during a run, and the run record (in progress and per partition).

May import `spec`, `execution` (through its `environment` interface, and the engine for
leftovers), `checkpoints`, `monitor`, `partition`, `workspace`, `config` and `errors`.
"""
