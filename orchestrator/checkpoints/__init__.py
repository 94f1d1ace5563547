"""Partition checkpoints: deterministic archives, validation of untrusted tar streams, confined
extraction, manifests and keys, tree scans and drift checks, the snapshot store (`store`: its
directories, listing and pruning; `chain`: deltas, layers and rebasing; `images`: the image
form; `swap`: putting a restored tree in place), mount checks and staging leftovers.

May import `execution` (the engine, for image layers and container extraction), `workspace`
and `errors`; never `build` or `spec`: what a checkpoint means to a run is `build`'s.
"""
