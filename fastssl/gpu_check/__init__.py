"""The stages of tools/gpu_check.py, which proves fastssl's GPU paths on one CUDA machine in one
command (docs/gpu_check.md): `runner` runs them guarded and on time, `goals` and `report` say what
they measured, and each stage has its module. Nothing here imports torch before a stage runs its
subprocesses: the tool starts, and reports, even where torch or a loader is broken.
"""
