"""Build sources: the verified, content-addressed cache, source sets, resumable downloads with
mirrors, the Debian route through apt (derived from the machine's own apt sources), and the
archive checks a source passes before first use.

May import `workspace` and `errors`; never Docker, `build` or `checkpoints`.
"""
