"""Memory budgets: the per-row cost is measured right, the chunk size follows from it, and a chunked step
computes what an unchunked one does. Peak memory and speed are measured by benchmarks/scale.py, never here."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dspt.backbone
from dspt.backbone import check_precision, load_backbone
from dspt.config import RunConfig
from dspt.errors import BackboneError, ConfigError
from dspt.losses import get_loss
from dspt.memory import OVERHEAD, PEAK_PER_SAVED, MemoryBudgetError, RowBudget, budget_bytes, saved_bytes
from dspt.prompt import PromptBatch, PromptLearner

NAMES = ["cat", "dog", "sports car", "sea lion", "x", "mountain bike", "tabby cat", "apple", "maple tree", "a",
         "red fox", "blue whale"]
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("dspt-tiny", None, device="cpu")


def test_saved_bytes_counts_what_autograd_keeps_once():
    w = torch.randn(8, 5)  # a constant: backward of x @ w needs w, then relu keeps its output
    n = 7
    assert saved_bytes(lambda x: torch.relu(x @ w), torch.randn(n, 8)) == w.nbytes + n * 5 * 4
    # the same storage saved twice (x * x keeps x for both factors) is one storage
    assert saved_bytes(lambda x: x * x, torch.randn(n, 3)) == n * 3 * 4 + n * 3 * 4


def test_the_row_cost_is_the_difference_of_two_probes():
    w = torch.randn(8, 5)
    budget = RowBudget(10**9)
    assert budget.row_cost(lambda x: torch.relu(x @ w), (torch.randn(100, 8),)) == 5 * 4  # the weight cancels


def test_chunk_rows_follow_the_budget_and_the_measured_cost():
    w = torch.randn(8, 64)
    fn, x = (lambda x: torch.relu(x @ w)), torch.randn(1000, 8)
    cost = 64 * 4
    nbytes = OVERHEAD + int(100.5 * cost * PEAK_PER_SAVED)
    budget = RowBudget(nbytes)
    assert budget.rows(fn, (x,)) == 100
    assert budget.last == {"rows": 1000, "per_row_bytes": cost, "chunk_rows": 100}
    assert RowBudget(OVERHEAD + int(2000 * cost * PEAK_PER_SAVED)).rows(fn, (x,)) is None  # all fit: no chunks
    with pytest.raises(MemoryBudgetError, match=r"cannot hold one prompt row .* raise --max-memory to at least"):
        RowBudget(OVERHEAD).rows(fn, (x,))


def test_budget_from_the_option_or_the_device():
    assert budget_bytes(1.5, torch.device("cpu")) == int(1.5 * 2**30)
    default = budget_bytes(None, torch.device("cpu"))
    assert default is None or default > 0
    with pytest.raises(ConfigError, match="--max-memory"):
        budget_bytes(0, torch.device("cpu"))
    with pytest.raises(ConfigError, match="--max-memory -1"):
        RunConfig(data="x", max_memory=-1, epochs=1, n_ctx=4).validate()


def _features_and_grads(model: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
    feats = model.text_features()
    gen = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(model.runs, 6, feats.shape[-1], generator=gen), dim=-1)
    labels = torch.arange(6) % feats.shape[1]
    loss = sum(get_loss("dspt")(model.logits(images, feats)[r], labels) for r in range(model.runs))
    (grad,) = torch.autograd.grad(loss + feats[..., 0].square().sum(), model.ctx)
    return feats.detach(), grad


@pytest.mark.parametrize("share_prefix", [True, False])
def test_a_budgeted_step_equals_the_unbounded_one(backbone, share_prefix):
    learners = [PromptLearner(backbone, NAMES, n_ctx=4, seed=s) for s in range(3)]
    for j, learner in enumerate(learners):
        with torch.no_grad():
            learner.ctx.copy_(torch.randn(learner.ctx.shape, generator=torch.Generator().manual_seed(j)))
    free = PromptBatch(backbone, learners, share_prefix=share_prefix)
    f0, g0 = _features_and_grads(free)
    probe = RowBudget(10**12)
    probe.rows(*_row_fn(free))
    cost = probe.last["per_row_bytes"]
    budget = RowBudget(OVERHEAD + int(5.5 * cost * PEAK_PER_SAVED))
    bounded = PromptBatch(backbone, learners, share_prefix=share_prefix, row_chunk=budget)
    f1, g1 = _features_and_grads(bounded)
    assert budget.last["chunk_rows"] == 5 and budget.last["rows"] == 3 * len(NAMES)  # it really chunked
    torch.testing.assert_close(f1, f0, **TOL)
    torch.testing.assert_close(g1, g0, **TOL)
    assert g0.abs().max() > 1e-4


def _row_fn(model: PromptBatch):
    """The (fn, per-row inputs, shared inputs) a budget sees for this model's pass: captured from a real pass."""
    seen = {}

    class Spy(RowBudget):
        def rows(self, fn, per_row, shared=()):
            seen["args"] = (fn, per_row, shared)
            return None

    model.row_chunk = Spy(0)
    with torch.no_grad():
        model.text_features()
    model.row_chunk = None
    return seen["args"]


def test_precision_a_device_cannot_compute_in_is_one_line(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(BackboneError, match="fp16 needs a CUDA GPU"):
        check_precision("fp16", cpu)
    monkeypatch.setattr(dspt.backbone, "cpu_bf16_supported", lambda: False)
    with pytest.raises(BackboneError, match="bf16 needs a CPU with native bf16.*use --precision fp32") as err:
        load_backbone("dspt-tiny", None, device="cpu", precision="bf16")
    assert "\n" not in str(err.value)
    check_precision("fp32", cpu)


def test_cpu_bf16_autocasts_the_tower_and_keeps_logits_and_loss_in_fp32(monkeypatch):
    """On a CPU with native bf16 (simulated: torch emulates it here) the text tower runs in bf16; the logits, the
    softmaxes and the loss are fp32, and close to the fp32 step."""
    monkeypatch.setattr(dspt.backbone, "cpu_bf16_supported", lambda: True)
    bf = load_backbone("dspt-tiny", None, device="cpu", precision="bf16")
    fp = load_backbone("dspt-tiny", None, device="cpu", precision="fp32")
    seen = []
    hook = bf.text.transformer.resblocks[0].mlp.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    learner = PromptLearner(bf, NAMES, n_ctx=4, seed=0)
    out = {}
    for name, b in (("bf16", bf), ("fp32", fp)):
        model = PromptBatch(b, [learner])
        images = F.normalize(torch.randn(1, 8, 128, generator=torch.Generator().manual_seed(1)), dim=-1)
        logits = model.logits(images)
        loss = get_loss("dspt")(logits[0], torch.arange(8))
        out[name] = (logits.detach(), loss.detach())
        assert logits.dtype == loss.dtype == torch.float32
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    torch.testing.assert_close(out["bf16"][0], out["fp32"][0], atol=0.5, rtol=0.05)  # logit scale 100
    assert out["bf16"][0].ne(out["fp32"][0]).any()  # bf16 really ran


def test_a_run_under_a_small_budget_trains_as_the_unbounded_run_and_records_it(tmp_path):
    import json

    from dspt.train import train

    from imagefolders import make_split_folders

    data = make_split_folders(tmp_path / "imgs", classes=5, train=6, test=3)
    base = dict(data=str(data), model="dspt-tiny", pretrained=None, shots=4, epochs=3, views=1, batch_size=4,
                n_ctx=4, device="cpu", cache_dir=str(tmp_path / "cache"), progress=False, noise_rate=0.2, lr=0.05)
    free = train(RunConfig(**base, output=str(tmp_path / "free")))
    cost = free["memory"]["per_row_bytes"]
    assert free["memory"]["chunk_rows"] is None and cost > 0 and free["memory"]["rows"] == 5
    small = (OVERHEAD + 2.5 * cost * PEAK_PER_SAVED) / 2**30
    bounded = train(RunConfig(**base, max_memory=small, output=str(tmp_path / "bounded")))
    assert bounded["memory"]["chunk_rows"] == 2 and bounded["memory"]["budget_gb"] == pytest.approx(small)

    def losses(run: str) -> list[float]:
        lines = (tmp_path / run / "log.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if '"epoch"' in line and '"loss"' in line]

    assert len(losses("bounded")) == 3
    assert losses("bounded") == pytest.approx(losses("free"), abs=1e-5)
    assert bounded["test_acc"] == pytest.approx(free["test_acc"], abs=1e-9)
    with pytest.raises(MemoryBudgetError, match="raise --max-memory"):
        train(RunConfig(**base, max_memory=OVERHEAD / 2**30, output=str(tmp_path / "tiny")))
    assert not (tmp_path / "tiny").exists()  # nothing half-written


def test_doctor_says_whether_bf16_runs_here_and_the_default_budget(monkeypatch, tmp_path, capsys):
    import dspt.doctor
    from dspt import cli

    for native, words in ((False, "bf16 not native: --precision bf16 is refused"), (True, "bf16 native")):
        monkeypatch.setattr(dspt.doctor, "cpu_bf16_supported", lambda native=native: native)
        cli.main(["doctor", "--cache-dir", str(tmp_path)])
        out = capsys.readouterr().out
        assert words in out and "default step budget" in out
