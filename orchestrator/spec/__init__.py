"""Stage files: the pydantic models and their units, reading YAML with line numbers and bounded
input, a stage's declared assets, and the plan (package and stage graphs).

Owns what a user writes. Imports nothing of lfsorch but `errors` and `sources.sets` (the
shape of a declared source); never Docker, never the workspace.
"""
