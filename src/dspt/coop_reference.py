"""CoOp's reference path: the training step as CoOp computes it, kept for side-by-side measurement.

The fast path trains on cached image features (`dspt.prepare`); the reference path (`path: reference`) instead
loads, augments and encodes every step's images through the frozen image tower, as CoOp does. The training
loop (`dspt.loop`) draws its features from `_ReferenceBatches` when a run takes this path.
"""
from __future__ import annotations

import torch

from .prepare import Prepared


class _ReferenceBatches:
    """CoOp's computation, kept for side-by-side measurement: every step loads its images, augments them
    (the backbone's train transform: CoOp's random-resized-crop + flip) and encodes them through the frozen
    image tower in fp32, whatever the run's precision; nothing is cached.

    Decoding and resizing run on a thread pool, as CoOp's DataLoader workers would, so the reference is not
    slowed by serial image loading. The random draws stay on the calling thread, per image from the step's
    seed, in the order the transform itself draws them: the numbers equal
    `encode_paths(..., train_transform, seed=step_seed)` and do not depend on the thread count.
    """

    def __init__(self, p: Prepared):
        import os
        from concurrent.futures import ThreadPoolExecutor

        from torchvision import transforms as T

        self.p = p
        steps = p.backbone.train_transform().transforms
        if not (isinstance(steps[0], T.RandomResizedCrop) and isinstance(steps[1], T.RandomHorizontalFlip)):
            raise TypeError("the reference path expects the train transform to start with RandomResizedCrop "
                            "and RandomHorizontalFlip")
        self.crop, self.flip, self.rest = steps[0], steps[1], T.Compose(steps[2:])
        self.pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))

    def _augment(self, image, crop: tuple[int, int, int, int], flip: bool) -> torch.Tensor:
        from torchvision.transforms import functional as TF

        image = TF.resized_crop(image, *crop, self.crop.size, self.crop.interpolation, antialias=self.crop.antialias)
        return self.rest(TF.hflip(image) if flip else image)

    def __call__(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        batch = self.pixels(idx, gen)
        model, device = self.p.backbone.model, self.p.backbone.device
        with torch.no_grad():
            feats = model.encode_image(batch.to(device, non_blocking=True))
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    def pixels(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The step's images [B, 3, H, W], loaded and augmented (an image-side learner encodes them itself)."""
        from .data.base import load_image
        from .features import view_seed

        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        images = list(self.pool.map(load_image, [self.p.train.paths[i] for i in idx.tolist()]))
        draws = []
        with torch.random.fork_rng(devices=[]):  # per-image seeding must not disturb the caller's RNG
            for k, image in enumerate(images):
                torch.manual_seed(view_seed(seed, 0, k))
                crop = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
                draws.append((crop, bool(torch.rand(1) < self.flip.p)))
        return torch.stack(list(self.pool.map(self._augment, images, *zip(*draws))))
