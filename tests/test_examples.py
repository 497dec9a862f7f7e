"""examples/pretrain.py trains as the README shows: the loss falls on its synthetic data."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pretrain():
    spec = importlib.util.spec_from_file_location("pretrain", ROOT / "examples" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model", ["vilt", "uniter", "soho"])
def test_pretrain_example_loss_falls(model, capsys):
    assert _pretrain().main(["--model", model, "--steps", "30", "--batch-size", "4", "--device", "cpu"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith("(falling)"), last


def test_pretrain_example_reads_a_data_file(tmp_path, capsys):
    import torch

    from vlkernels.models import build_model

    batches = [build_model("visualbert", "tiny").synthetic_batch(4, generator=torch.Generator().manual_seed(i))
               for i in range(2)]
    torch.save(batches, tmp_path / "batches.pt")
    assert _pretrain().main(["--model", "visualbert", "--steps", "4", "--data", str(tmp_path / "batches.pt"),
                             "--device", "cpu"]) == 0
    assert "4 steps" in capsys.readouterr().out
