"""dspt: Double-Softmax Prompt Tuning of CLIP models on images with noisy labels."""
from .version import __version__

from .config import RunConfig  # noqa: E402
from .export import load_classifier  # noqa: E402
from .losses import get_loss, loss_names  # noqa: E402
from .noise import NoisyLabels, make_noisy_labels  # noqa: E402
from .train import load_prompt, train, zeroshot  # noqa: E402

__all__ = ["RunConfig", "NoisyLabels", "get_loss", "load_classifier", "load_prompt", "loss_names",
           "make_noisy_labels", "train", "zeroshot", "__version__"]
