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


def _bad_data_files(tmp_path):
    import torch

    from vlkernels.models import build_model

    other = build_model("vilt", "tiny").synthetic_batch(2, generator=torch.Generator().manual_seed(0))
    own = build_model("visualbert", "tiny").synthetic_batch(2, generator=torch.Generator().manual_seed(0))
    wrong_dims = dict(own, **{key: value[0] for key, value in own.items() if isinstance(value, torch.Tensor)})
    files = {"missing": (tmp_path / "nowhere.pt", "no such file")}
    (tmp_path / "text.pt").write_text("not a torch file")
    files["garbage"] = (tmp_path / "text.pt", "cannot be read")
    for name, content, message in (("dict", own, "expected a non-empty list"), ("empty", [], "expected a non-empty"),
                                   ("other model", [other], "does not fit this model"),
                                   ("wrong dims", [wrong_dims], "this model takes")):
        path = tmp_path / f"{name.replace(' ', '_')}.pt"
        torch.save(content, path)
        files[name] = (path, message)
    return files


def test_pretrain_example_answers_a_bad_data_file_in_one_line(tmp_path, capsys):
    for name, (path, message) in _bad_data_files(tmp_path).items():
        code = _pretrain().main(["--model", "visualbert", "--steps", "2", "--data", str(path), "--device", "cpu"])
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == 2, (name, captured.err)
        assert len(lines) == 1 and message in lines[0] and str(path) in lines[0], (name, captured.err)
        assert "Traceback" not in captured.err + captured.out, name
