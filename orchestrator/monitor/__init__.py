"""What a run tells: the event bus and its typed events (one dataclass per kind), the console,
the JSON event log with rotation, metrics from containers and the host, the build report, and
plugin hooks.

Imports only `errors` of lfsorch, and the run record's model (`build.state`) for reports:
every other subsystem publishes to it.
"""
