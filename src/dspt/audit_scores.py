"""The scores of `dspt audit` and its defaults, apart from the audit itself so that the CLI can list them
without importing torch. docs/audit.md measures each score; the defaults follow those measurements."""
from __future__ import annotations

__all__ = ["DEFAULT_ESTIMATOR", "DEFAULT_SCORE", "ESTIMATORS", "SCORES", "SCORE_TEXT"]

#: The scores of an audit; low means suspicious for each. One ranks the images and picks the flags (--score);
#: all are measured beside it (`detection_metrics`, where the true labels are known), so the choice can be revisited.
SCORES = ("label_quality", "given_prob", "zeroshot_prob", "combined_prob", "in_sample_prob", "dual_prompt_clean")
SCORE_TEXT = {
    "label_quality": "cleanlab normalized margin of the out-of-sample probabilities, (p_given - max other p + 1) / 2: "
                     "the margin score, rescaled (low: suspicious)",
    "given_prob": "probability of the given label under the fold's tuned prompt (low: suspicious)",
    "zeroshot_prob": "probability of the given label under the zero-shot classifier, no tuning (low: suspicious)",
    "combined_prob": "geometric mean of given_prob and zeroshot_prob (low: suspicious)",
    "in_sample_prob": "probability of the given label averaged over the epochs of the fold runs that trained on the "
                      "image (in sample; low: suspicious)",
    "dual_prompt_clean": "with --method dualprompt: sigmoid of the given class's positive minus negative prompt logit "
                         "under the fold's prompts, the probability that the label is clean (DeFT's detector; low: "
                         "suspicious)",
}
#: the score that ranks audit.csv and sizes the flags, unless --score says otherwise
DEFAULT_SCORE = "combined_prob"
#: how the share of wrong labels, and so the number of flags, is estimated (`dspt.noise_estimate`): "auto" is
#: `reference` where the test split's labels can be trusted (`dspt.audit.trusted_test_labels`), else `mixture`
DEFAULT_ESTIMATOR = "auto"
#: the estimators of the share of wrong labels (`dspt.noise_estimate`)
ESTIMATORS = ("reference", "mixture", "confident_joint")
