"""Model and checkpoint files the tools cannot use: one `error:` line naming the file, exit 2."""
import json

import pytest
import torch
import yaml

from trainer.backbones import get_backbone


@pytest.mark.parametrize("model_section, message", [
    ({"backbone": "tiny", "embedding_size": 8, "width": 8, "norm": "bogus"}, "norm must be 'batch' or 'none'"),
    ({"backbone": "r18", "embedding_size": 8, "width": 8}, "has no option 'width'"),
])
def test_verify_with_an_unusable_backbone_option_names_the_file(tmp_path, capsys, model_section, message):
    from eval.verify import main

    run = tmp_path / "run"
    run.mkdir()
    torch.save(get_backbone("tiny", num_features=8, width=8).state_dict(), run / "model.pt")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": model_section}))
    assert main(["--model", str(run), "--bin", str(tmp_path / "lfw.bin"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    assert str(run / "model.pt") in line and message in line and "run's configuration" in line, err
    assert "Traceback" not in err


def test_checkpoint_export_of_a_torchscript_file_names_it(tmp_path, capsys):
    from trainer.checkpoint import main

    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(step / "trainer.pt"))
    (step / "COMPLETE").write_text(json.dumps({"step": 1, "world_size": 1, "class_ranges": [[0, 2]]}))
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(step / "trainer.pt") in err and "TorchScript" in err, err
    assert not (tmp_path / "x.pt").exists()
