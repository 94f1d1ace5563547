"""Where a package's script runs: the build environment interface (`environment`: job, result,
`BuildEnvironment`), its first implementation (`container`: a fresh container per attempt on
the local engine, with mounts, limits, privileges, timeout, byte-exact logs, figures), the
Docker engine connection, its labels and image lookups, and the build-host images.

May import `spec` (models), `monitor.metrics`, `sources.aptsources` (the machine's mirror for
debootstrap), `workspace` and `errors`; never `build` or `checkpoints`.
"""
