"""The studies (docs/RESULTS.md): one module per study on a shared core.

* :mod:`bench.experiments.noise`: does UNPG help, do gathered (global) negatives help? Arms at
  label noise 0 % / 20 %, ablations, the bf16 state (issue 7, 26);
  ``python -m bench.experiment`` (``--group core|ablation|state|all``).
* :mod:`bench.experiments.ratio`: UNPG against the ratio of negative pairs to classes, with
  look-alike families (issue 16); ``python -m bench.experiment --group ratio``.
* :mod:`bench.experiments.finetune`: fine-tuning a pretrained model on a small set in another
  domain (issue 22); ``python -m bench.finetune``.
* :mod:`bench.experiments.core`: what they share: a training run (torchrun, 2 ranks), the
  tiny model's evaluation (val.bin accuracy, a held-out synthetic gallery's TAR@FAR on all
  pairs and within look-alike families), loss statistics and L0, picture grids.

``bench/experiment.py`` and ``bench/finetune.py`` keep the documented command lines.
"""
