"""The process's runtime, below the trainer's components and beside nothing of the algorithm:

* :mod:`trainer.runtime.process_group`: rank/world from torchrun's environment, the process
  group's setup, bounded barriers and the small collectives of the orchestration (``DistInfo``);
* :mod:`trainer.runtime.run_lock`: one writer per run folder (``RunLock``), and a worker that
  dies with its launcher;
* :mod:`trainer.runtime.preemption`: a signal stops the run at a step boundary with a
  checkpoint (``PreemptionHandler``, ``Preempted``).

These modules import nothing else of the project (tests/test_architecture.py).
"""
