"""``python -m bench.finetune``: the documented command line of the fine-tuning study, kept as a
thin alias of :mod:`bench.experiments.finetune` (where the study lives)."""
from bench.experiments.finetune import main

if __name__ == "__main__":
    raise SystemExit(main())
