"""Launchers: torchrun on one node or many, SLURM, Kubernetes (see docs/launch.md).

``python -m launch {single,multi,slurm,env} ...``; the SLURM variable mapping is
in :mod:`launch.slurm_env`, the environment defaults in :mod:`launch.env_defaults`.
"""
