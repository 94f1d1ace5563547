"""Partition checkpoints: deterministic archives, validation of untrusted tar streams, confined
extraction, manifests and keys, tree scans and drift checks, the snapshot store, mount checks
and staging leftovers.

May import `execution` (the engine, for image layers and container extraction), `workspace`
and `errors`; never `build` or `spec`: what a checkpoint means to a run is `build`'s.
"""
