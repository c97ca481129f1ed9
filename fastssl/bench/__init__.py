"""Timing shared by the benchmark tools and the throughput profile.

tools/bench_loaders.py and tools/profile_throughput.py time loaders the same way
(`loaders.py`); tools/bench_mira.py and tools/profile_throughput.py time the assignment
the same way (`assignment.py`). Keeping the timing here means a profile's figures and a
benchmark's can be compared. `profile.py` runs the profile's stages.
"""
