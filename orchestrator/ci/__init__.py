"""CI runners: a plan split into jobs that fit a time limit, the checkpoint key each job ends
at, and the workflow files (GitHub Actions, GitLab CI) that run those jobs one after another.

Imports spec, build (inputs, checkpoint keys), config, lockfile and monitor's records; never
the engine: `api` runs the jobs.
"""
