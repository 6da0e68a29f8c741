"""Rewards on hand-written completions; ESWR against Plutchik angles computed here from DESIGN.md §5."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emorl_jax.data.emotions import label_set, similarity_matrix
from emorl_jax.rl.rewards import (Parsed, accuracy_reward, alpha_schedule, compute_rewards, eswr_reward, eswr_rewards,
                                  format_reward, parse_completion)

MELD = label_set("meld")
PLUTCHIK = similarity_matrix(MELD, "plutchik")
NEIGHBOUR = 0.5 * (math.cos(math.radians(45)) + 1)  # 0.8536
ESR = ("<think><content>She says 'I can't believe it'.</content><acoustics>High pitch, fast.</acoustics>"
       "<summary>Aroused, negative.</summary></think><answer>{}</answer>")


def esr(answer="fear"):
    return ESR.format(answer)


# ------------------------------------------------------------------------------------------ parsing
def test_well_formed_esr_with_whitespace():
    text = ("  <think>\n <content> words </content>\n\t<acoustics>\nlow pitch\n</acoustics> <summary>calm"
            "</summary>\n</think>\n\n<answer> Neutral </answer>\n")
    p = parse_completion(text, MELD, mode="esr")
    assert p == Parsed(answer="neutral", well_formed=True, error=None, answer_text="Neutral",
                       think="<content> words </content>\n\t<acoustics>\nlow pitch\n</acoustics> <summary>calm"
                             "</summary>",
                       content="words", acoustics="low pitch", summary="calm")
    assert format_reward(p) == 1.0


@pytest.mark.parametrize("text, error", [
    # missing tags
    (esr().replace("</summary>", ""), "missing </summary>"),
    ("<answer>fear</answer>", "missing <think>"),
    (esr().replace("<acoustics>High pitch, fast.</acoustics>", ""), "missing <acoustics>"),
    # wrong order
    ("<think><acoustics>a</acoustics><content>c</content><summary>s</summary></think><answer>fear</answer>",
     "wrong order: <acoustics> where <content> belongs"),
    ("<answer>fear</answer><think><content>c</content><acoustics>a</acoustics><summary>s</summary></think>",
     "wrong order: <answer> where <think> belongs"),
    # empty blocks
    (esr().replace("Aroused, negative.", " \n "), "empty <summary> block"),
    (esr(" "), "empty <answer> block"),
    # duplicates
    (esr() + "<answer>surprise</answer>", "2 <answer> tags"),
    (esr().replace("</content>", "</content><content>more</content>"), "2 <content> tags"),
    # text outside the envelope
    ("Sure! " + esr(), "text outside the blocks before <think>: 'Sure!'"),
    (esr() + "<|im_end|>", "text outside the blocks after </answer>: '<|im_end|>'"),
    (esr().replace("</think>", "</think>So:"), "text outside the blocks between </think> and <answer>: 'So:'"),
    (esr().replace("<acoustics>", "and <acoustics>"),
     "text outside the blocks between </content> and <acoustics>: 'and'"),
    (esr().replace("<think>", "<think><think>"), "2 <think> tags"),
])
def test_malformed_esr(text, error):
    p = parse_completion(text, MELD, mode="esr")
    assert (p.well_formed, p.error, format_reward(p)) == (False, error, 0.0)
    assert p.think is None and p.content is None


def test_answer_is_judged_apart_from_format():
    assert parse_completion("Sure! " + esr(), MELD).answer == "fear"  # malformed, answer still read
    assert parse_completion("<answer>Fear</answer>", MELD).answer == "fear"
    assert parse_completion(esr() + "<answer>surprise</answer>", MELD).answer is None  # two answers
    assert parse_completion(esr() + "<answer>fear</answer>", MELD).answer is None  # two, even if equal
    assert parse_completion("<think>x</think>fear", MELD).answer is None  # no answer block
    assert parse_completion("</answer>fear<answer>", MELD).answer is None  # reversed tags


@pytest.mark.parametrize("word, label", [("Joy.", "happy"), ("  SCARED ", "fear"), ("anger!", "angry"),
                                         ("neutral", "neutral"), ("surprised", "surprise")])
def test_synonyms(word, label):
    p = parse_completion(esr(word), MELD)
    assert (p.answer, p.answer_text, p.well_formed) == (label, word.strip(), True)


def test_unknown_label_is_well_formed_but_has_no_answer():
    p = parse_completion(esr("boredom"), MELD)
    assert (p.well_formed, p.answer, p.answer_text) == (True, None, "boredom")
    assert parse_completion(esr("fear or surprise"), MELD).answer is None
    assert parse_completion(esr("surprise"), label_set("iemocap4")).answer is None  # out of this task's set


@pytest.mark.parametrize("mode, text, well_formed, error, think", [
    ("ir", "<answer>sad</answer>", True, None, None),
    ("ir", "\n<answer>\nsad\n</answer>\n", True, None, None),
    ("ir", "<think>hm</think><answer>sad</answer>", False, "unexpected <think> in ir mode", None),
    ("ir", "It is <answer>sad</answer>", False, "text outside the blocks before <answer>: 'It is'", None),
    ("eur", "<think>low and slow</think> <answer>sad</answer>", True, None, "low and slow"),
    ("eur", "<think> </think><answer>sad</answer>", False, "empty <think> block", None),
    ("eur", "<answer>sad</answer>", False, "missing <think>", None),
    ("eur", "<think><content>c</content></think><answer>sad</answer>", False, "unexpected <content> in eur mode",
     None),
    ("esr", "<think>low and slow</think><answer>sad</answer>", False, "missing <content>", None),
])
def test_modes(mode, text, well_formed, error, think):
    p = parse_completion(text, MELD, mode=mode)
    assert (p.answer, p.well_formed, p.error, p.think) == ("sad", well_formed, error, think)


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown mode 'cot'; known: ir, eur, esr"):
        parse_completion("<answer>sad</answer>", MELD, mode="cot")


_WS = st.text(alphabet=" \n\t", max_size=3)


@settings(max_examples=60, deadline=None)
@given(st.lists(_WS, min_size=17, max_size=17), st.sampled_from(MELD))
def test_whitespace_between_and_inside_blocks_is_ignored(spaces, label):
    """The ESR layout with arbitrary whitespace at each of its 17 gaps parses to the same sections."""
    parts = ["<think>", "<content>", "c", "</content>", "<acoustics>", "a", "</acoustics>", "<summary>", "s",
             "</summary>", "</think>", "<answer>", label, "</answer>"]
    gaps = iter(spaces)
    text = next(gaps) + "".join(part + next(gaps) for part in parts)
    p = parse_completion(text, MELD)
    assert (p.well_formed, p.answer, p.content, p.acoustics, p.summary) == (True, label, "c", "a", "s")


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_stray_character_outside_the_blocks_breaks_the_format(data):
    text = esr()
    outside = [0, len(text)] + [text.index(t) + len(t) for t in ("</content>", "</acoustics>", "</summary>",
                                                                   "</think>")]
    at = data.draw(st.sampled_from(outside))
    char = data.draw(st.characters(blacklist_categories=("Zs", "Zl", "Zp", "Cc", "Cs")))
    p = parse_completion(text[:at] + char + text[at:], MELD)
    assert not p.well_formed and p.error.startswith("text outside the blocks") and p.answer == "fear"


# ------------------------------------------------------------------------------------------ ESWR and accuracy
def _plutchik_reward(pred, gold, alpha, gamma=0.7):
    """The reward from DESIGN.md §5 with the wheel's angles written out here."""
    angles = {"happy": 0, "fear": 90, "surprise": 135, "sad": 180, "disgust": 225, "angry": 270}
    if pred == gold:
        return 1.0
    s = 0.5 if "neutral" in (pred, gold) else 0.5 * (math.cos(math.radians(angles[pred] - angles[gold])) + 1)
    return alpha * s if s > gamma else 0.0


def test_eswr_examples():
    assert eswr_reward("neutral", "neutral", PLUTCHIK, MELD) == 1.0  # the literal equation would give 0
    assert eswr_reward("fear", "surprise", PLUTCHIK, MELD, alpha=0.5) == pytest.approx(0.5 * NEIGHBOUR, abs=1e-12)
    assert eswr_reward("surprise", "fear", PLUTCHIK, MELD) == pytest.approx(0.8535533905932737, abs=1e-12)
    assert eswr_reward("happy", "sad", PLUTCHIK, MELD) == 0.0  # 180°
    assert eswr_reward("fear", "sad", PLUTCHIK, MELD) == 0.0  # 90°: S = 0.5
    assert eswr_reward("neutral", "angry", PLUTCHIK, MELD) == 0.0  # S = 0.5 < gamma
    assert eswr_reward(None, "angry", PLUTCHIK, MELD) == 0.0
    assert eswr_reward("bored", "angry", PLUTCHIK, MELD) == 0.0
    assert eswr_reward("fear", "surprise", PLUTCHIK, MELD, gamma=0.9) == 0.0


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_eswr_all_pairs_against_angles(alpha):
    preds = [p for p in MELD for _ in MELD] + [None]
    golds = [g for _ in MELD for g in MELD] + ["sad"]
    got = eswr_rewards(preds, golds, PLUTCHIK, MELD, alpha=alpha)
    want = [_plutchik_reward(p, g, alpha) for p, g in zip(preds[:-1], golds[:-1])] + [0.0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert got.dtype == np.float64
    assert [eswr_reward(p, g, PLUTCHIK, MELD, alpha=alpha) for p, g in zip(preds, golds)] == list(got)
    # The four neighbour pairs of the synthetic corpus, both ways, are the only partial credits.
    partial = {(p, g) for p, g, r in zip(preds, golds, got) if 0 < r < 1}
    pairs = {("fear", "surprise"), ("surprise", "sad"), ("sad", "disgust"), ("disgust", "angry")}
    assert partial == pairs | {(g, p) for p, g in pairs}


def test_eswr_on_iemocap4_equals_exact_match():
    labels = label_set("iemocap4")
    sim = similarity_matrix(labels, "plutchik")
    preds = [p for p in labels for _ in labels]
    golds = [g for _ in labels for g in labels]
    np.testing.assert_array_equal(eswr_rewards(preds, golds, sim, labels),
                                  [accuracy_reward(p, g) for p, g in zip(preds, golds)])


def test_eswr_errors():
    with pytest.raises(ValueError, match=r"similarity matrix has shape \(4, 4\), expected \(7, 7\)"):
        eswr_reward("fear", "sad", np.eye(4), MELD)
    with pytest.raises(ValueError, match="gold label 'joy' is not in the label set"):
        eswr_rewards(["fear"], ["joy"], PLUTCHIK, MELD)
    with pytest.raises(ValueError, match="2 predictions but 1 gold labels"):
        eswr_rewards(["fear", "sad"], ["sad"], PLUTCHIK, MELD)


def test_accuracy_reward():
    assert (accuracy_reward("sad", "sad"), accuracy_reward("fear", "surprise"), accuracy_reward(None, "sad")) == \
        (1.0, 0.0, 0.0)


def test_alpha_schedule():
    assert alpha_schedule(70, 100) == 1.0
    assert alpha_schedule(70, 100, "constant", 0.5) == 0.5
    assert [alpha_schedule(s, 4, "linear_decay", 0.8) for s in range(5)] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])
    with pytest.raises(ValueError, match="unknown kind 'cosine'; known: constant, linear_decay"):
        alpha_schedule(0, 10, "cosine")
    with pytest.raises(ValueError, match="got step=11, total_steps=10"):
        alpha_schedule(11, 10, "linear_decay")


# ------------------------------------------------------------------------------------------ combined
COMPLETIONS = [esr("fear"), esr("surprise"), "Sure! " + esr("fear"), esr("boredom"), "<answer>sad</answer>",
               esr("Neutral"), esr("happy") + "<answer>sad</answer>"]
GOLDS = ["fear", "fear", "fear", "fear", "sad", "neutral", "sad"]


def test_compute_rewards_eswr():
    out = compute_rewards(COMPLETIONS, GOLDS, labels=MELD, similarity=PLUTCHIK, mode="esr", alpha=0.5)
    assert set(out) == {"total", "format", "eswr", "correct", "valid"}
    np.testing.assert_array_equal(out["format"], [1, 1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(out["correct"], [1, 0, 1, 0, 1, 1, 0])
    np.testing.assert_array_equal(out["valid"], [1, 1, 1, 0, 1, 1, 0])
    np.testing.assert_allclose(out["eswr"], [1, 0.5 * NEIGHBOUR, 1, 0, 1, 1, 0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["total"], out["format"] + out["eswr"], rtol=0, atol=0)
    assert all(v.dtype == np.float64 and v.shape == (7,) for v in out.values())


def test_compute_rewards_binary_and_weights():
    out = compute_rewards(COMPLETIONS, GOLDS, labels=MELD, similarity=PLUTCHIK, accuracy="binary",
                          weights={"format": 0.5, "accuracy": 2.0})
    assert set(out) == {"total", "format", "accuracy", "correct", "valid"}
    np.testing.assert_array_equal(out["accuracy"], [1, 0, 1, 0, 1, 1, 0])
    np.testing.assert_allclose(out["total"], [2.5, 0.5, 2.0, 0.5, 2.0, 2.5, 0.0], rtol=0, atol=0)
    ir = compute_rewards(["<answer>sad</answer>", esr("sad")], ["sad", "sad"], labels=MELD, similarity=PLUTCHIK,
                         mode="ir")
    np.testing.assert_array_equal(ir["total"], [2.0, 1.0])


def test_compute_rewards_errors():
    kw = dict(labels=MELD, similarity=PLUTCHIK)
    with pytest.raises(ValueError, match=r"unknown reward weights \['rules'\]; known: \['accuracy', 'format'\]"):
        compute_rewards(COMPLETIONS, GOLDS, weights={"rules": 1.0}, **kw)
    with pytest.raises(ValueError, match="7 completions but 6 gold labels"):
        compute_rewards(COMPLETIONS, GOLDS[:-1], **kw)
    with pytest.raises(ValueError, match="accuracy must be one of"):
        compute_rewards(COMPLETIONS, GOLDS, accuracy="f1", **kw)
    with pytest.raises(ValueError, match="gold label 'joy' is not in the label set"):
        compute_rewards(["<answer>joy</answer>"], ["joy"], accuracy="binary", **kw)
    with pytest.raises(ValueError, match="accuracy='eswr' needs a similarity matrix"):
        compute_rewards(COMPLETIONS, GOLDS, labels=MELD)
