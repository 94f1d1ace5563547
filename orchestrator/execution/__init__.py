"""Where a package's script runs: the build environment interface (`environment`: job, result,
`BuildEnvironment`), its first implementation (`container`: a fresh container per attempt on
the local engine, with mounts, limits, privileges, timeout, byte-exact logs, figures), the
same for chroot packages with the partition as the root filesystem (`chroot`, and `chrootroot`:
what the partition must hold first), the Docker engine connection, its labels and image
lookups, and the build-host images.

May import `spec` (models), `monitor.metrics`, `sources.aptsources` (the machine's mirror for
debootstrap), `workspace` and `errors`; never `build` or `checkpoints`.
"""
