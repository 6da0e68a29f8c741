"""The hub diagnostic against hand-computed expected rewards of constant answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from emorl_jax.data import emotions
from emorl_jax.rl import hubs

LABELS = ("a", "b", "c")
SIMILARITY = np.array([[1.0, 0.8, 0.1], [0.8, 1.0, 0.75], [0.1, 0.75, 1.0]])


def test_priors_count_the_golds():
    np.testing.assert_allclose(hubs.label_priors(["a", "b", "a", "c", "a", "b"], LABELS), [3 / 6, 2 / 6, 1 / 6])
    with pytest.raises(ValueError, match=r"\['z'\] are not in the label set"):
        hubs.label_priors(["a", "z"], LABELS)


def test_constant_answers_by_hand():
    priors = np.array([0.5, 0.3, 0.2])
    # ESWR alpha 0.5, gamma 0.7: a earns 1 on a, 0.5*0.8 on b, nothing on c (0.1 <= gamma); and so on.
    expected = [0.5 + 0.3 * 0.4, 0.5 * 0.4 + 0.3 + 0.2 * 0.375, 0.3 * 0.375 + 0.2]  # 0.62, 0.575, 0.3125
    got = hubs.constant_answer_rewards(priors, SIMILARITY, LABELS, alpha=0.5, gamma=0.7)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose(hubs.constant_answer_rewards(priors, SIMILARITY, LABELS, accuracy="binary"), priors)
    # gamma 0.78 drops the b/c credit (0.75): b earns 0.5*0.4 + 0.3, c earns 0.2.
    np.testing.assert_allclose(hubs.constant_answer_rewards(priors, SIMILARITY, LABELS, alpha=0.5, gamma=0.78),
                               [0.62, 0.5, 0.2], rtol=1e-12)

    warnings = hubs.hub_warnings(LABELS, np.array(expected), policy_reward=0.6)
    assert len(warnings) == 1 and warnings[0].startswith("always answering 'a' would earn an accuracy reward of 0.620")
    assert hubs.hub_warnings(LABELS, np.array(expected), policy_reward=0.7) == []
    table = hubs.hub_table(LABELS, priors, np.array(expected)).splitlines()
    assert [line.split()[0] for line in table[2:]] == ["a", "b", "c"]


def test_plutchik_hubs_on_a_balanced_corpus():
    """The issue's hubs: under Plutchik with gamma 0.7 surprise, sad and disgust each have two neighbours at
    (1 + cos 45 deg) / 2 = 0.854, so with alpha 1 a constant answer earns (1 + 2 * 0.854) / 7 on balanced priors."""
    labels = emotions.label_set("synthetic")
    similarity = emotions.similarity_matrix(labels, "plutchik")
    got = dict(zip(labels, hubs.constant_answer_rewards(np.full(7, 1 / 7), similarity, labels, alpha=1.0)))
    near = (1 + math.cos(math.pi / 4)) / 2
    for hub in ("surprise", "sad", "disgust"):
        assert got[hub] == pytest.approx((1 + 2 * near) / 7, rel=1e-12)
    for one_neighbour in ("fear", "angry"):
        assert got[one_neighbour] == pytest.approx((1 + near) / 7, rel=1e-12)
    for alone in ("neutral", "happy"):
        assert got[alone] == pytest.approx(1 / 7, rel=1e-12)
