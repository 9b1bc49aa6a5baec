import sys

from mlc.commands.train.display import MetricsSink
from mlc.runs import Run


def test_tensorboard_on_without_the_package_says_so_and_metrics_still_land(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    run = Run.create(tmp_path / "runs", "train", ["train"])
    sink = MetricsSink(run, tensorboard=True)
    sink.log({"step": 1, "loss": 2.5})
    sink.close()
    assert "tensorboard package is not installed" in capsys.readouterr().err
    assert "tensorboard package is not installed" in (run.path / "log.txt").read_text()
    assert '"loss": 2.5' in (run.path / "metrics.jsonl").read_text()
    assert not (run.path / "tensorboard").exists()
