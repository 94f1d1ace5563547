"""Where a package's script runs: the Docker engine connection and its labels, the build-host
images, and the container a package attempt runs in (mounts, limits, privileges, timeout,
byte-exact logs, figures).

May import `spec` (models), `monitor` (events, metrics), `sources.aptsources` (the
machine's mirror for debootstrap), `workspace` and `errors`; never `build` or `checkpoints`.
"""
