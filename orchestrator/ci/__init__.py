"""CI runners: a plan split into jobs that fit a time limit, the checkpoint key each job ends
at, the workflow files (GitHub Actions, GitLab CI) that run those jobs one after another, and
one job (`jobs`): pull the lock's images and the previous checkpoint, build, push.

`slices`, `keys` and `workflow` import spec, build (inputs, checkpoint keys), config, lockfile
and monitor's records, never the engine; `jobs` drives a job through the library API (`api`).
"""
