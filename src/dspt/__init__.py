"""dspt: Double-Softmax Prompt Tuning of CLIP models on images with noisy labels."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dspt")  # one version number: pyproject.toml's
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

from .config import RunConfig  # noqa: E402
from .losses import get_loss, loss_names  # noqa: E402
from .noise import NoisyLabels, make_noisy_labels  # noqa: E402
from .train import load_prompt, train, zeroshot  # noqa: E402

__all__ = ["RunConfig", "NoisyLabels", "get_loss", "load_prompt", "loss_names", "make_noisy_labels", "train",
           "zeroshot", "__version__"]
