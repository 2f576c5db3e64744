"""The comparison's figures are written atomically as PNGs."""
import pandas as pd

from dspt import plots


def _one_file(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_accuracy_vs_noise_with_bands(tmp_path):
    stats = pd.DataFrame({"noise_rate": [0.4, 0.0, 0.0, 0.4], "method": ["ce", "ce", "dspt", "dspt"],
                          "mean": [50.0, 80.0, 79.0, 70.0], "std": [2.0, 1.0, float("nan"), 3.0], "n": [3, 3, 1, 3]})
    path = tmp_path / "fig" / "accuracy_vs_noise.png"
    plots.accuracy_vs_noise(stats, 41.0, path, "title\nsecond line")
    _one_file(path)


def test_accuracy_vs_lr(tmp_path):
    runs = pd.DataFrame([{"noise_rate": r, "method": m, "lr": lr, "seed": s, "test_acc": 50.0 + s + 10 * lr}
                         for r in (0.0, 0.4) for m in ("ce", "dspt") for lr in (0.002, 0.02) for s in (1, 2)])
    path = tmp_path / "lr" / "accuracy_vs_lr.png"
    plots.accuracy_vs_lr(runs, path, "title")
    _one_file(path)


def test_mechanism_plot_without_loss_columns(tmp_path):
    """Logs of an older dspt have gradient norms but no losses: the plot still shows what there is."""
    curves = pd.DataFrame([{"method": m, "noise_rate": 0.4, "epoch": e, "grad_norm_clean": 1.0 / (e + 1),
                            "grad_norm_noisy": 0.5} for m in ("ce", "dspt") for e in range(4)])
    path = tmp_path / "m" / "mechanism.png"
    plots.mechanism(curves, path, "title")
    _one_file(path)
