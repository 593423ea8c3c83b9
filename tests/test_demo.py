"""The demo runs end to end at a tiny size and writes its table and plot."""

import numpy as np

from kronjax import demo


def test_demo_prints_tables_writes_plot_and_kfac_learns(tmp_path, capsys):
  out = tmp_path / "demo.png"
  # One task keeps compilation (most of the time) short; the CNN has the
  # accuracy column as well.
  results = demo.main(["--task", "cnn", "--steps", "12", "--batch", "64",
                       "--adam-lrs", "1e-2", "--out", str(out)])
  printed = capsys.readouterr().out
  assert [r["task"].name for r in results] == [
      demo.make_tasks(["cnn"], 0)[0].name]
  assert "after 12 steps" in printed
  assert "test accuracy" in printed and "K-FAC/Adam" in printed
  assert out.stat().st_size > 10_000 and str(out) in printed
  for r in results:
    kfac, adam = r["kfac"], r["adam"]
    assert len(kfac["loss"]) == 12 and len(adam["loss"]) >= 12
    assert np.all(np.isfinite(kfac["loss"]))
    assert np.mean(kfac["loss"][-3:]) < np.mean(kfac["loss"][:3])
