"""`dspt audit`: which training labels are probably wrong, scored out of sample.

A model tuned on some labels predicts those very labels too well (in-sample predictions are biased towards
them, wrong ones included), so every training image is scored by prompts that never saw it: the images are
split into K folds (stratified by given label), K runs are tuned on K-1 folds each through `dspt.train`
(same run folders, resume, cache; one shared table with each fold left out by --exclude, so the K runs
train as one batch whenever their epochs take equally many steps), and each fold is predicted by the run
that left it out (cross-fitting).
On those out-of-sample probabilities (the scores are described in `audit_scores`):
- the probability of the given label, the zero-shot model's, their geometric mean (the default ranking), the
  in-sample average over epochs and, with --method dualprompt, DeFT's dual-prompt score;
- cleanlab's label quality (`get_label_quality_scores`, normalized margin) and its issue flags
  (`find_label_issues`, confident learning), kept beside dspt's own flags for comparison;
- the share of wrong labels is estimated with an interval (`dspt.noise_estimate`) and that many of the most
  suspicious images are flagged.
Written: `audit.csv` (every image, most suspicious first: path, given and suggested class, scores, flag),
`audit.json`, the review page (`review.html`) and, where the true labels are known (injected noise, CIFAR-N),
precision / recall / AUROC of each score against the true flips and a precision-recall plot.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .audit_scores import DEFAULT_ESTIMATOR, DEFAULT_SCORE, SCORE_TEXT, SCORES
from .config import RunConfig
from .errors import ConfigError, DataError, TrainingError
from .io import atomic_write, atomic_write_json, atomic_write_text
from .noise_estimate import ESTIMATORS, NoiseEstimate, Reference, estimate_noise_rate, flag_top

log = logging.getLogger(__name__)



@dataclass
class AuditResult:
    table: pd.DataFrame  # one row per training image, most suspicious first
    metrics: dict[str, Any]  # per score: precision, recall, AUROC, average precision (true labels known)
    files: dict[str, Path]
    noise_estimate: NoiseEstimate | None = None
    encoded: dict[str, int] | None = None  # image-views encoded: by the audit's own pass, by its fold runs, total
    estimator_chosen: str = ""  # which estimator sized the flags, and why


def fold_assignment(given: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold of every sample, stratified by given label: a class's samples are spread over the folds in turn,
    after a seeded shuffle, so every fold's training set keeps every class it can."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(given), dtype=np.int64)
    offset = 0
    for c in np.unique(given):
        idx = rng.permutation(np.flatnonzero(given == c))
        out[idx] = (np.arange(len(idx)) + offset) % folds
        offset += len(idx)
    return out


def _write_fold_table(path: Path, rows: list[tuple[str, str, str]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["path", "label", "split"])
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _as_given(path: str) -> str:
    """An image path as the user named it, made absolute: symbolic links are kept, not resolved to their
    targets, so audit.csv and the review page show the user's own paths."""
    return os.path.normpath(os.path.abspath(os.path.expanduser(path)))


def _fold_configs(cfg: RunConfig, p: Any, fold: np.ndarray, folds: int, out: Path) -> list[RunConfig]:
    """One run per fold, tuned on the other folds' images with their given labels (no noise added: the labels
    are the ones under audit), tested on the run's test split.

    Every fold reads one table (all training images with their given labels, and the test images) and leaves
    its own images out with --exclude, so the folds share one data source and train as one batch."""
    classes = p.train.classnames
    names = out / "folds" / "classnames.txt"
    atomic_write_text(names, "".join(c + "\n" for c in classes))
    given = p.labels.given
    train = [_as_given(x) for x in p.train.paths]
    test = [(_as_given(x), classes[y], "test") for x, y in zip(p.test.paths, p.test.labels)]
    table = out / "folds" / "data.csv"
    _write_fold_table(table, [(x, classes[given[i]], "train") for i, x in enumerate(train)] + test)
    cfgs = []
    for k in range(folds):
        held = out / "folds" / f"heldout{k}.txt"
        atomic_write_text(held, "".join(x + "\n" for i, x in enumerate(train) if fold[i] == k))
        cfgs.append(replace(cfg, data=str(table), dataset="csv", root=None, test_data=None, classnames=str(names),
                            exclude=str(held), shots=0, noise="sym", noise_rate=0.0, fp=None, noise_file=None,
                            label_set=None, val_shots=None, output=str(out / "folds" / f"fold{k}"),
                            results=str(out / "folds" / "results.csv"), epochs=cfg.epochs))
    return cfgs


def _drop_stale_folds(cfgs: list[RunConfig], folder: Path) -> None:
    """Remove the fold runs of an earlier audit that this one cannot reuse: a fold run whose table, held-out
    list or labels changed (its input files' contents are recorded), or whose settings differ, would score
    images with prompts that saw them; fold folders beyond this audit's count are left over too. The folds
    folder is the audit's own, so they are retrained, never reused."""
    import shutil

    from .rundir import check_run_dir

    keep = {Path(c.output).name for c in cfgs}
    for run_dir in sorted(folder.glob("fold*")):
        if run_dir.is_dir() and run_dir.name not in keep:
            log.info("removing %s: left over from an audit with more folds", run_dir)
            shutil.rmtree(run_dir)
    for c in cfgs:
        try:
            check_run_dir(c.resolved(), Path(c.output))
        except TrainingError as exc:
            log.warning("retraining %s: %s", Path(c.output).name, str(exc).split(";")[0])
            shutil.rmtree(c.output)


def check_folds(given: np.ndarray, classnames: list[str], folds: int) -> None:
    """Refuse, in one line naming the fix, a split that cannot cross-fit: fewer than 2 folds, a fold with no
    image, or a class with fewer images (by its given label) than folds, whose every fold run would then train
    without it for the images it holds out."""
    if folds < 2:
        raise ConfigError(f"--folds {folds}: cross-fitting needs at least 2 folds")
    if len(given) < folds:
        raise ConfigError(f"--folds {folds} with {len(given)} training image(s) leaves a fold empty; use at most "
                          f"--folds {max(len(given), 2)}")
    counts = np.bincount(given, minlength=len(classnames))
    thin = np.flatnonzero(counts < folds)
    if len(thin):
        worst = int(thin[np.argmin(counts[thin])])
        raise ConfigError(f"class '{classnames[worst]}' has {int(counts[worst])} image(s), fewer than --folds {folds} "
                          f"({len(thin)} such class(es)): a fold would hold out images of a class its run never "
                          f"saw; lower --folds to {max(int(counts[counts > 0].min()), 2)} or drop the class")


@dataclass
class CrossFit:
    probs: np.ndarray  # [N, C] out of sample: each image by the fold run that left it out
    in_sample: np.ndarray  # [N] p(given) averaged over epochs and over the fold runs that trained on the image
    fold: np.ndarray  # [N] fold of each image
    encoded: int  # image-views the fold runs trained now encoded (0 when every image was in the cache)
    p: Any  # the prepared run
    dual_clean: np.ndarray | None = None  # [N] out of sample, --method dualprompt: sigmoid(z+_given - z-_given)


def _in_sample(cfgs: list[RunConfig], fold: np.ndarray, train: list[str]) -> np.ndarray:
    """Each image's in-sample p(given), averaged over the fold runs that trained on it (`in_sample.csv` of a run,
    in its `train_files.csv` order)."""
    where = {x: i for i, x in enumerate(train)}
    total, count = np.zeros(len(train)), np.zeros(len(train))
    for c in cfgs:
        run = Path(c.output)
        paths = pd.read_csv(run / "train_files.csv")["path"].map(_as_given)
        values = pd.read_csv(run / "in_sample.csv")["mean_given_prob"].to_numpy(float)
        idx = paths.map(where)
        if idx.isna().any() or len(values) != len(idx):
            raise TrainingError(f"fold run {run} trained on images outside the audit; delete {run.parent} and "
                                f"audit again")
        total[idx.to_numpy(int)] += values
        count[idx.to_numpy(int)] += 1
    return total / np.maximum(count, 1)


def cross_fit_probabilities(cfg: RunConfig, folds: int, out: Path, p: Any = None) -> CrossFit:
    """Every image predicted by the prompts of the fold run that left it out, and its in-sample score.
    `p`: the prepared run, when the caller has it."""
    from .train import prepare, train_batch

    p = prepare(cfg) if p is None else p
    n, c = len(p.train), p.train.num_classes
    check_folds(p.labels.given, p.train.classnames, folds)
    fold = fold_assignment(p.labels.given, folds, p.seeds["shots"])
    cfgs = _fold_configs(cfg, p, fold, folds, out)
    _drop_stale_folds(cfgs, out / "folds")
    fresh = [not (Path(c.output) / "metrics.json").is_file() for c in cfgs]
    outcomes = train_batch(cfgs)
    encoded = 0
    for k, (status, payload) in enumerate(outcomes):
        if status != "ok":
            raise payload
        if fresh[k]:
            encoded += sum(payload.get("features_encoded", {}).values())
    probs = np.zeros((n, c), dtype=np.float64)
    dual = np.zeros(n) if cfg.method == "dualprompt" else None
    feats = p.train_feats[0]
    given = torch.as_tensor(p.labels.given, device=feats.device)
    for k in range(folds):
        held = torch.as_tensor(np.flatnonzero(fold == k), device=feats.device)
        logits = _fold_logits(Path(cfgs[k].output), p, feats[held], 0)
        probs[held.cpu().numpy()] = torch.softmax(logits.double(), -1).cpu().numpy()
        if dual is not None:
            from .methods.dualprompt import clean_probability

            negative = _fold_logits(Path(cfgs[k].output), p, feats[held], 1)
            dual[held.cpu().numpy()] = clean_probability(logits, negative, given[held]).double().cpu().numpy()
    return CrossFit(probs, _in_sample(cfgs, fold, [_as_given(x) for x in p.train.paths]), fold, encoded, p, dual)


@torch.no_grad()
def _fold_logits(run: Path, p: Any, feats: torch.Tensor, learner: int) -> torch.Tensor:
    from .train import load_prompt

    clf = load_prompt(run, backbone=p.backbone, device=str(feats.device), learner=learner)
    text = clf.text_features().to(feats.device, feats.dtype)
    return p.backbone.logit_scale * feats @ text.t()


def zeroshot_logits(cfg: RunConfig, p: Any, feats: torch.Tensor | None = None) -> np.ndarray:
    """[N, C] logits of the untuned (zero-shot) prompt on `feats` (default: every training image, unaugmented):
    the reference an audit must beat to be worth its tuning, and the classifier the `reference` estimator
    calibrates (it never saw the labels under audit)."""
    from .train import zeroshot_text_features

    feats = p.train_feats[0] if feats is None else feats
    with torch.no_grad():
        text = zeroshot_text_features(p.backbone, p.train.classnames, cfg.template)
        return (p.backbone.logit_scale * feats.float() @ text.to(feats.device).float().t()).double().cpu().numpy()


def trusted_test_labels(cfg: RunConfig) -> bool:
    """Whether the test split's labels can serve as clean reference labels: noise injected into the training
    labels (the test split keeps the dataset's own), test images given apart (--test-data), or a benchmark
    dataset's own test split. A test split cut from the very table whose labels are audited (--noise given,
    no --test-data) carries their errors, and is not trusted."""
    return cfg.noise != "given" or cfg.test_data is not None or cfg.dataset not in ("csv", "folder")


def _check_estimator(requested: str, trusted: bool) -> None:
    if requested == "reference" and not trusted:
        raise ConfigError("--estimator reference calibrates on the test split's labels, but they come from the "
                          "labels under audit (--noise given, no --test-data); pass --test-data with clean labels "
                          "or use --estimator mixture")


def choose_estimate(requested: str, estimates: dict[str, NoiseEstimate]) -> tuple[NoiseEstimate, str]:
    """The estimate that sizes the flags, and why it was chosen: `auto` takes `reference` where it was computed
    (trusted test labels) and the reference classifier pins the share, else `mixture`."""
    if requested != "auto":
        return estimates[requested], f"--estimator {requested}"
    ref = estimates.get("reference")
    if ref is None:
        return estimates["mixture"], ("auto: mixture, as the test labels come from the labels under audit (no clean "
                                      "reference to calibrate on)")
    if not ref.identified:
        return estimates["mixture"], (f"auto: mixture, as the reference estimate is not identified (EM ends at "
                                      f"{ref.starts[0]:.1%} and {ref.starts[1]:.1%} from two starts)")
    if not ref.reliable:
        return estimates["mixture"], (f"auto: mixture, as the reference estimator reads {ref.clean_reading:.1%} wrong "
                                      "among the clean test labels (more than 15 %: the zero-shot model is too weak "
                                      "or miscalibrated here); neither figure is a measurement of the noise")
    reading = "" if ref.clean_reading is None else f"; it reads {ref.clean_reading:.1%} wrong among them"
    return ref, f"auto: reference (the zero-shot model calibrated on the clean test labels{reading})"


def score_labels(given: np.ndarray, probs: np.ndarray, zeroshot: np.ndarray | None = None,
                 in_sample: np.ndarray | None = None, dual_clean: np.ndarray | None = None) -> pd.DataFrame:
    """cleanlab's label quality (the normalized margin: the margin of the given label over the best other class,
    rescaled) and issue flags (`cleanlab_flagged`), dspt's probability of the given label, the suggestion; with
    `zeroshot` (the untuned model's probabilities), its probability of the given label and the geometric mean of
    the two; with `in_sample`, the in-sample score beside them."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    quality = get_label_quality_scores(given, probs, method="normalized_margin")
    try:
        flagged = find_label_issues(given, probs, filter_by="prune_by_noise_rate")
    except ValueError as exc:  # e.g. a class with no sample
        raise DataError(f"cleanlab could not estimate the label noise ({exc}); audit more images per class") from None
    suggested = probs.argmax(1)
    rows = np.arange(len(given))
    given_prob = probs[rows, given]
    out = pd.DataFrame({"given_idx": given, "suggested_idx": suggested, "label_quality": quality,
                        "given_prob": given_prob, "suggested_prob": probs[rows, suggested],
                        "cleanlab_flagged": flagged})
    if zeroshot is not None:
        out["zeroshot_prob"] = zeroshot[rows, given]
        out["combined_prob"] = np.sqrt(given_prob * out["zeroshot_prob"].to_numpy())
    if in_sample is not None:
        out["in_sample_prob"] = in_sample
    if dual_clean is not None:
        out["dual_prompt_clean"] = dual_clean
    return out


def detection_metrics(table: pd.DataFrame, is_noisy: np.ndarray) -> dict[str, Any]:
    """Per score: AUROC and average precision of ranking the true flips first; for the audit's flags and for
    cleanlab's, precision and recall; for each score, precision and recall among as many top-ranked images as
    were flagged."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    noisy = np.asarray(is_noisy, dtype=bool)
    out: dict[str, Any] = {"flips": int(noisy.sum()), "images": len(noisy)}
    flagged = table["flagged"].to_numpy(bool)
    k = int(flagged.sum())
    for column in ("flagged", "cleanlab_flagged"):
        if column in table.columns:
            f = table[column].to_numpy(bool)
            out[column] = {"count": int(f.sum()), "precision": float(noisy[f].mean()) if f.any() else math.nan,
                           "recall": float(f[noisy].mean()) if noisy.any() else math.nan}
    for score in [s for s in SCORES if s in table.columns]:
        suspicion = -table[score].to_numpy(float)
        both = noisy.any() and (~noisy).any()
        top = np.argsort(suspicion, kind="stable")[::-1][:k] if k else np.array([], dtype=int)
        out[score] = {"auroc": float(roc_auc_score(noisy, suspicion)) if both else math.nan,
                      "average_precision": float(average_precision_score(noisy, suspicion)) if both else math.nan,
                      f"precision_at_{k}": float(noisy[top].mean()) if k else math.nan,
                      f"recall_at_{k}": float(noisy[top].sum() / noisy.sum()) if k and noisy.any() else math.nan}
    return out


def _pr_plot(table: pd.DataFrame, is_noisy: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    fig, ax = plt.subplots(figsize=(5, 4))
    for score in [s for s in SCORES if s in table.columns]:
        prec, rec, _ = precision_recall_curve(is_noisy, -table[score].to_numpy(float))
        ax.plot(rec, prec, label=score)
    ax.axhline(float(np.mean(is_noisy)), color="gray", linestyle="--", label="share of wrong labels")
    ax.set_xlabel("recall of the wrong labels")
    ax.set_ylabel("precision")
    ax.set_title("Finding the wrong labels (out-of-sample scores)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def apply_flags(table: pd.DataFrame, how: str) -> pd.DataFrame:
    """The training labels after acting on the flags without review: `drop` leaves the flagged images out,
    `relabel` gives them the suggested class. Columns path,label: what `dspt train --data FILE` reads."""
    if how not in APPLY:
        raise ConfigError(f"--apply '{how}' unknown; choose one of: {', '.join(APPLY)}")
    flagged = table["flagged"].astype(bool)
    if how == "drop":
        kept = table[~flagged]
        emptied = sorted(set(table["given"]) - set(kept["given"]), key=str)
        if emptied:
            n = int((table["given"] == emptied[0]).sum())
            raise DataError(f"--apply drop would leave class '{emptied[0]}' without images (all {n} of its images "
                            f"flagged; {len(emptied)} such class(es)): the audit's prompts may have collapsed; review "
                            f"the flags (review.html) or use --apply relabel")
        return pd.DataFrame({"path": kept["path"], "label": kept["given"]})
    return pd.DataFrame({"path": table["path"], "label": table["suggested"].where(flagged, table["given"])})


APPLY = ("drop", "relabel")


def audit(cfg: RunConfig, output: str | Path, folds: int = 5, review: bool = True, apply: str | None = None,
          score: str = DEFAULT_SCORE, estimator: str = DEFAULT_ESTIMATOR, flag_rate: float | None = None,
          ) -> AuditResult:
    """Cross-fit, score, and write the audit of `cfg`'s training images into `output`, ranked by `score`; as many
    images are flagged as the estimated share of wrong labels (`estimator`) says, or `flag_rate` of them where the
    user knows better (a spot check, a review budget). `apply` ("drop" or "relabel") also writes
    cleaned_labels.csv (`apply_flags`)."""
    if apply is not None and apply not in APPLY:
        raise ConfigError(f"--apply '{apply}' unknown; choose one of: {', '.join(APPLY)}")
    if score not in SCORES:
        raise ConfigError(f"--score '{score}' unknown; choose one of: {', '.join(SCORES)}")
    if score == "dual_prompt_clean" and cfg.method != "dualprompt":
        raise ConfigError("--score dual_prompt_clean needs --method dualprompt (the fold runs' negative prompts)")
    if estimator not in ("auto", *ESTIMATORS):
        raise ConfigError(f"--estimator '{estimator}' unknown; choose one of: auto, {', '.join(ESTIMATORS)}")
    if flag_rate is not None and not 0 <= flag_rate < 1:
        raise ConfigError(f"--flag-rate {flag_rate:g} is outside [0, 1); give the share of images to flag, e.g. 0.1")
    from .train import prepare

    cfg = cfg.resolved()
    from .learners import get_learner

    if get_learner(cfg.learner).module:
        raise ConfigError(f"dspt audit scores held-out images with each fold's class features on cached image "
                          f"features, which learner '{cfg.learner}' does not have; audit with --learner coop or kgcoop")
    trusted = trusted_test_labels(cfg)
    _check_estimator(estimator, trusted)
    p = prepare(cfg)  # reads and checks the data before anything is written
    check_folds(p.labels.given, p.train.classnames, folds)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    fit = cross_fit_probabilities(cfg, folds, out, p)
    p, fold, classes = fit.p, fit.fold, p.train.classnames
    given = p.labels.given
    zs_logits = zeroshot_logits(cfg, p)
    scores = score_labels(given, fit.probs, torch.softmax(torch.from_numpy(zs_logits), -1).numpy(), fit.in_sample,
                          fit.dual_clean)
    reference = Reference(zs_logits, zeroshot_logits(cfg, p, p.test_feats), np.asarray(p.test.labels)) if trusted else None
    estimates = {m: estimate_noise_rate(scores[score].to_numpy(float), given, fit.probs, method=m, seed=cfg.seed,
                                        reference=reference)
                 for m in ESTIMATORS if m != "reference" or trusted}
    estimate, chosen_because = choose_estimate(estimator, estimates)
    measured = estimate.method == "reference" and estimate.identified and estimate.reliable
    if flag_rate is not None:
        chosen_because = (f"--flag-rate {flag_rate:g}: the share to flag was given (the {estimate.method} estimate "
                          "is reported beside it)")
    elif estimator == "auto" and estimate.method != "reference" and trusted:
        log.warning("%s", chosen_because)
    scores["flagged"] = flag_top(scores[score].to_numpy(float), estimate.rate if flag_rate is None else flag_rate)
    if apply is not None and flag_rate is None and not measured:
        log.warning("--apply %s acts on flags counted by the %s estimate, which is not a measurement of the noise "
                    "here; check the flags on review.html, or give --flag-rate from a spot check of some labels",
                    apply, estimate.method)
    table = pd.DataFrame({"path": [_as_given(x) for x in p.train.paths],
                          "given": [classes[i] for i in scores["given_idx"]],
                          "suggested": [classes[i] for i in scores["suggested_idx"]], "fold": fold})
    table = pd.concat([table, scores.drop(columns=["given_idx", "suggested_idx"])], axis=1)
    known = (cfg.noise != "given" and cfg.noise_rate > 0) or bool((p.labels.true != p.labels.given).any())
    if known:
        table["true"] = [classes[i] for i in p.labels.true]
        table["wrong_label"] = p.labels.is_noisy
    tie = "given_prob" if score != "given_prob" else "label_quality"
    table = table.sort_values([score, tie], kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    files = {"audit.csv": out / "audit.csv"}
    atomic_write_text(files["audit.csv"], table.to_csv(index=False))
    metrics = detection_metrics(table, table["wrong_label"].to_numpy(bool)) if known else {}
    if known:
        metrics["realised_noise_rate"] = float(table["wrong_label"].mean())
        files["precision_recall.png"] = out / "precision_recall.png"
        _pr_plot(table, table["wrong_label"].to_numpy(bool), files["precision_recall.png"])
    encoded = {"audit": int(sum(p.cache["encoded"].values())), "fold_runs": fit.encoded}
    encoded["total"] = encoded["audit"] + encoded["fold_runs"]
    summary = {"images": len(table), "flagged": int(table["flagged"].sum()), "folds": folds,
               "ranked_by": score, "noise_estimate": estimate.to_dict(), "estimator_chosen": chosen_because,
               "flag_rate": flag_rate,
               "noise_estimates": {m: e.to_dict() for m, e in estimates.items()},
               "features_encoded": encoded, "config": cfg.to_dict(), "true_labels_known": known,
               "detection": metrics,
               "scores": SCORE_TEXT | {"flagged": f"the {int(table['flagged'].sum())} lowest {score}: " + (
                                           f"as many as the estimated share of wrong labels ({estimate.method}) says"
                                           if flag_rate is None else f"{flag_rate:g} of the images (--flag-rate)"),
                                       "cleanlab_flagged": "cleanlab find_label_issues (confident learning, "
                                                           "prune_by_noise_rate), for comparison"}}
    files["audit.json"] = out / "audit.json"
    atomic_write_json(files["audit.json"], summary)
    if review:
        from .review import write_review_page

        files["review.html"] = write_review_page(table, list(classes), out / "review.html")
    if apply is not None:  # last: a refusal (a class left empty) keeps the audit's own files, complete
        try:
            cleaned = apply_flags(table, apply)
        except DataError as exc:
            raise DataError(f"{exc}; the audit itself is written to {out}") from None
        files["cleaned_labels.csv"] = out / "cleaned_labels.csv"
        atomic_write_text(files["cleaned_labels.csv"], cleaned.to_csv(index=False))
    return AuditResult(table, metrics, files, estimate, encoded, chosen_because)
