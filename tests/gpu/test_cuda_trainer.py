"""GPU tests of the trainer (``pytest -m gpu``; skipped without CUDA; run by the device check):

- the steady-state training step (engine, head, both optimizers, fp16 GradScaler) under
  ``torch.cuda.set_sync_debug_mode("error")``: any synchronising call raises;
- one-process NCCL training on a generated RecordIO set with the project's loader, in fp16,
  with a checkpoint, then resumed from it.
"""
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture
def nccl_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_steady_state_steps_make_no_sync_under_sync_debug_mode(tmp_path, nccl_group, precision):
    from tests.trainer.synthetic import MemoryLoader, make_dataset
    from tests.trainer.workers import tiny_config
    from trainer.loop import Trainer

    cfg = tiny_config(tmp_path / "run", ["run.max_steps=8", "data.batch_size=16", "loss.unpg=true",
                                         "loss.sample_rate=0.5", f"engine.precision={precision}",
                                         "logging.log_every=100", "logging.hist_every=0"])
    imgs, labels = make_dataset(identities=24, per_id=8, seed=0)
    t = Trainer(cfg, lambda c, d: MemoryLoader(imgs, labels, c.data.batch_size, d.rank, d.world_size,
                                               c.run.seed)).setup()
    # the batches on the GPU before the steps (the loader's host-to-device copy is not the step's)
    batches = iter([(x.cuda(), y.cuda()) for _, (x, y) in zip(range(8), iter(t.loader))])
    t._next_batch = lambda: next(batches)
    original, checked = t._one_step, []

    def one_step():
        steady = 3 <= t.step + 1 <= 6  # no logging, validation or checkpoint around these
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if steady else "default")
        try:
            out = original()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        checked.append(steady)
        return out

    t._one_step = one_step
    res = t.train()
    assert sum(checked) == 4 and len(res["history"]) == 8


def test_one_process_nccl_training_checkpoint_and_resume(tmp_path, nccl_group):
    from data_tools.synth import generate_dataset
    from trainer.config import load_config
    from trainer.loop import Trainer

    data = tmp_path / "synth"
    generate_dataset(data, 32, 8, seed=0, workers=1, val_identities=8, val_pairs=40)
    ov = [f"run.output={tmp_path / 'run'}", f"data.train_dir={data}", "model.backbone=tiny", "model.embedding_size=64",
          "data.batch_size=32", "engine.precision=fp16", "checkpoint.save_every=10", "validation.targets=[val]",
          "validation.every=10", "logging.log_every=5", "logging.progress_bar=false", "data.num_threads=2"]
    first = Trainer(load_config("configs/_base_/default.yaml", ov + ["run.max_steps=10"])).setup()
    assert first.d.device.type == "cuda"
    h1 = first.train()["history"]
    second = Trainer(load_config("configs/_base_/default.yaml", ov + ["run.max_steps=20"])).setup()
    assert second.step == 10  # resumed from the checkpoint at step 10
    res = second.train()
    assert [h["step"] for h in res["history"]] == list(range(1, 21))
    assert res["history"][:10] == h1
    assert all(h["loss"] == h["loss"] for h in res["history"] if not h.get("skipped"))
    assert [v["step"] for v in res["val"]][-1] == 20
