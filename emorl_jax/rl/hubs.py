"""Hub labels: constant answers that the accuracy reward pays well under the corpus priors (issue 14).

Answering label a for every clip earns, in expectation over the gold labels g of the training corpus,
E[r(a)] = sum_g p(g) r(a, g), where r is ESWR (1 for a == g, alpha * S[a, g] when S[a, g] > gamma, else 0) or
the binary reward. Under ESWR a label with several close neighbours collects partial credit from all of them
(surprise, sad and disgust each have two Plutchik neighbours at 0.854 with gamma 0.7), and under imbalanced
priors the majority label pays well even with the binary reward. When such a constant answer pays more than
the starting policy's sampled accuracy reward, GRPO can climb towards it: `hub_warnings` says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from emorl_jax.metrics import format_table
from emorl_jax.rl.rewards import eswr_rewards


def label_priors(golds: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """p(g) [L] float64: the share of each of `labels` among `golds` (a gold outside `labels` raises)."""
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({g for g in golds if g not in index})
    if unknown:
        raise ValueError(f"label_priors: labels {unknown} are not in the label set {list(labels)}")
    if not golds:
        raise ValueError("label_priors: no gold labels")
    return np.bincount([index[g] for g in golds], minlength=len(labels)) / len(golds)


def constant_answer_rewards(priors: np.ndarray, similarity: np.ndarray, labels: Sequence[str], *,
                            accuracy: str = "eswr", alpha: float = 1.0, gamma: float = 0.7) -> np.ndarray:
    """E[r(a)] [L] float64: the expected accuracy reward of answering labels[a] to every clip, gold labels drawn
    from `priors` [L]; accuracy "eswr" (similarity [L, L], alpha, gamma as in `rewards.eswr_rewards`) or
    "binary" (= priors)."""
    priors = np.asarray(priors, dtype=np.float64)
    if priors.shape != (len(labels),):
        raise ValueError(f"constant_answer_rewards: priors have shape {priors.shape}, expected ({len(labels)},)")
    if accuracy == "binary":
        return priors.copy()
    if accuracy != "eswr":
        raise ValueError(f"constant_answer_rewards: accuracy must be 'eswr' or 'binary', got {accuracy!r}")
    size = len(labels)
    answers = [labels[a] for a in range(size) for _ in range(size)]
    golds = [labels[g] for _ in range(size) for g in range(size)]
    reward = eswr_rewards(answers, golds, similarity, labels, alpha=alpha, gamma=gamma).reshape(size, size)
    return reward @ priors


def hub_table(labels: Sequence[str], priors: np.ndarray, expected: np.ndarray) -> str:
    """A text table, one row per label: its prior and the expected reward of always answering it (best first)."""
    order = np.argsort(-np.asarray(expected), kind="stable")
    rows = [{"constant answer": labels[a], "prior": float(priors[a]), "expected accuracy reward": float(expected[a])}
            for a in order]
    return format_table(rows)


def hub_warnings(labels: Sequence[str], expected: np.ndarray, policy_reward: float) -> list[str]:
    """One warning per constant answer whose expected accuracy reward exceeds `policy_reward`, the mean sampled
    accuracy reward of the policy GRPO starts from (highest first)."""
    return [f"always answering {labels[a]!r} would earn an accuracy reward of {expected[a]:.3f} on average, more "
            f"than the starting policy's sampled {policy_reward:.3f}: GRPO may drift towards this hub label"
            for a in np.argsort(-np.asarray(expected), kind="stable") if expected[a] > policy_reward]
