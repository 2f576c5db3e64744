"""The demo's figure is written atomically as a PNG."""
import pandas as pd

from dspt.plots import plot


def test_plot_writes_a_png_and_no_temporary_file(tmp_path):
    rows = pd.DataFrame({"noise_rate": [0.4, 0.0, 0.0, 0.4], "loss": ["ce", "ce", "dspt", "dspt"],
                         "test_acc": [50.0, 80.0, 79.0, 70.0]})
    path = tmp_path / "fig" / "accuracy_vs_noise.png"
    plot(rows, 41.0, ["ce", "dspt"], path, "title\nsecond line")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    assert [p.name for p in path.parent.iterdir()] == [path.name]
