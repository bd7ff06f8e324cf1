import os

# Two cores on CI: keep every process (and spawned rank) single-threaded.
os.environ.setdefault("OMP_NUM_THREADS", "1")
