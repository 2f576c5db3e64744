"""On a CUDA GPU: the memory budget's chunks, bf16 and fp16 autocast and a training run compute what they should.
Skipped where no GPU is visible (this project's CI); `benchmarks/gpu_check.sh` runs them with `-m gpu`."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dspt.backbone import load_backbone
from dspt.config import RunConfig
from dspt.losses import get_loss
from dspt.memory import OVERHEAD, PEAK_PER_SAVED, RowBudget, budget_bytes
from dspt.prompt import PromptBatch, PromptLearner

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NAMES = ["cat", "dog", "sports car", "sea lion", "x", "mountain bike", "tabby cat", "apple", "maple tree", "a"]


def _step(model: PromptBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    feats = model.text_features()
    gen = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(model.runs, 6, feats.shape[-1], generator=gen), dim=-1).cuda()
    logits = model.logits(images, feats)
    loss = sum(get_loss("dspt")(logits[r], torch.arange(6, device="cuda") % len(NAMES)) for r in range(model.runs))
    (grad,) = torch.autograd.grad(loss, model.ctx)
    return feats.detach(), logits.detach(), grad


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_budgeted_step_on_the_gpu_equals_the_unbounded_one(precision):
    backbone = load_backbone("dspt-tiny", None, device="cuda", precision=precision)
    learners = [PromptLearner(backbone, NAMES, n_ctx=4, seed=s) for s in range(3)]
    free = PromptBatch(backbone, learners)
    probe = RowBudget(10**12)
    PromptBatch(backbone, learners, row_chunk=probe).text_features()
    budget = RowBudget(OVERHEAD + int(4.5 * probe.last["per_row_bytes"] * PEAK_PER_SAVED))
    bounded = PromptBatch(backbone, learners, row_chunk=budget)
    f0, l0, g0 = _step(free)
    f1, l1, g1 = _step(bounded)
    assert budget.last["chunk_rows"] == 4
    tol = dict(atol=1e-5, rtol=1e-5) if precision == "fp32" else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(f1, f0, **tol)
    torch.testing.assert_close(g1, g0, **tol)
    assert l0.dtype == torch.float32  # logits (and the loss) stay fp32 under autocast


def test_the_default_budget_is_a_share_of_the_free_gpu_memory():
    free = torch.cuda.mem_get_info()[0]
    assert 0.7 * free <= budget_bytes(None, torch.device("cuda")) <= 0.8 * free + 1


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_run_trains_on_the_gpu(tmp_path, precision):
    from dspt.train import train

    from imagefolders import make_split_folders

    data = make_split_folders(tmp_path / "imgs", classes=4, train=6, test=3)
    metrics = train(RunConfig(data=str(data), model="dspt-tiny", pretrained=None, shots=4, epochs=2, views=1,
                              batch_size=4, n_ctx=4, device="cuda", precision=precision, progress=False,
                              cache_dir=str(tmp_path / "cache"), output=str(tmp_path / "run")))
    assert metrics["memory"]["budget_gb"] > 0 and 0 <= metrics["test_acc"] <= 100
