"""Miniature copies of the corpus releases, in the on-disk layouts of DATASETS.md, with synthesized audio.

Each `make_<corpus>(tmp)` builds its release under `tmp` and returns what the reader must give for it
(`Expected`: the corpus root, the records in reading order, and the report's skipped/ignored entries),
keyed by split (MELD), protocol (IEMOCAP) or calm option (RAVDESS). Audio is `synth_voice` only:
MELD 48 kHz AAC mp4 (mono, stereo, and 6 channels with a silent channel 0), IEMOCAP 16 kHz mono wav,
RAVDESS 48 kHz, SAVEE 44.1 kHz, CREMA-D 16 kHz, TESS 24.414 kHz. Import from tests with
`from corpus_fixtures import make_meld` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
from audio_fixtures import synth_voice, write_audio

from emorl_jax.data.corpora import HIDDEN, iemocap, meld, ravdess
from emorl_jax.data.corpora.base import Utterance


@dataclasses.dataclass
class Expected:
    """What a reader returns for a fixture: records in order, report.skipped and report.ignored."""

    root: Path
    records: list[Utterance]
    skipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    ignored: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """label -> number of records."""
        out: dict[str, int] = {}
        for utt in self.records:
            out[utt.label] = out.get(utt.label, 0) + 1
        return out


def _voice(path: Path, seconds: float, rate: int, seed: int, channels: int = 1, silent_first: bool = False) -> None:
    wave = synth_voice(seconds, sample_rate=rate, f0=120.0 + 7.0 * (seed % 20), seed=seed, channels=channels)
    if silent_first:
        wave[:, 0] = 0.0
    write_audio(path, wave, rate)


# ---------------------------------------------------------------------------------------------- MELD
# split -> rows: Sr No., Utterance, Speaker, Emotion, Sentiment, Dialogue_ID, Utterance_ID, Season, Episode,
# StartTime, EndTime. Quirks: curly quotes, quoted commas and quotes, 1- and 2-digit hours, gaps in Sr No.,
# Dialogue_ID and Utterance_ID, speaker "All".
MELD_ROWS = {
    "train": [
        (1, "Oh my God, he’s lost it. He’s totally lost it.", "Phoebe", "sadness", "negative", 0, 0, 4, 7,
         "0:20:57,256", "0:21:00,049"),
        (2, "What?", "Monica", "surprise", "negative", 0, 1, 4, 7, "0:21:00,049", "0:21:01,598"),
        (5, "Y’know what? We’re gonna go.", "All", "joy", "positive", 0, 3, 4, 7, "0:21:04,100", "0:21:06,000"),
        (7, "Get out!", "Ross", "anger", "negative", 2, 0, 2, 13, "00:04:12,100", "00:04:13,250"),
        (8, "I’m scared, okay?", "Rachel", "fear", "negative", 125, 3, 6, 2, "00:10:01,000", "00:10:02,400"),
        (9, "Okay.", "Joey", "neutral", "neutral", 3, 0, 1, 5, "00:00:03,020", "00:00:04,010"),
    ],
    "dev": [
        (1, "Oh, hi!", "Chandler", "joy", "positive", 0, 0, 3, 1, "0:01:00,000", "0:01:02,500"),
        (2, "That’s disgusting.", "Monica", "disgust", "negative", 0, 1, 3, 1, "0:01:02,600", "0:01:04,000"),
        (4, "Where is he?", "Ross", "neutral", "neutral", 110, 7, 8, 3, "00:12:00,000", "00:12:01,000"),
        (5, "He left, okay?", "Rachel", "sadness", "negative", 110, 8, 8, 3, "00:12:01,100", "00:12:03,000"),
    ],
    "test": [
        (1, "No way!", "Joey", "surprise", "positive", 0, 0, 5, 9, "0:00:10,000", "0:00:11,000"),
        (2, "Stop saying “we were on a break”, Ross.", "Rachel", "anger", "negative", 0, 1, 5, 9,
         "0:00:11,100", "0:00:13,000"),
        (3, "Fine.", "Chandler", "neutral", "neutral", 1, 0, 2, 4, "10:01:00,000", "10:01:01,000"),
        (6, "I’m afraid of \"that\".", "Phoebe", "fear", "negative", 1, 2, 2, 4, "10:01:05,000", "10:01:06,500"),
    ],
}
MELD_CHANNELS = {("train", 3, 0): 6, ("test", 1, 0): 2}  # (split, dia, utt) -> channels (default mono)
MELD_LABELS = {"neutral": "neutral", "joy": "happy", "sadness": "sad", "anger": "angry", "surprise": "surprise",
               "fear": "fear", "disgust": "disgust"}


def make_meld(tmp: Path) -> dict[str, Expected]:
    """MELD.Raw under `tmp`: per split a CRLF CSV and its clip folder. dev dia110_utt7 has no clip (a known
    fault), train dia125_utt3.mp4 is garbage bytes (corrupt), train dia3_utt0 has 6 channels with a silent
    channel 0, test dia1_utt0 is stereo, and train_splits/dia999_utt0.mp4 has no CSV row."""
    root = Path(tmp) / "MELD.Raw"
    layout = {"train": ("train/train_sent_emo.csv", "train/train_splits"),
              "dev": ("dev_sent_emo.csv", "dev_splits_complete"),
              "test": ("test_sent_emo.csv", "output_repeated_splits_test")}
    expected = {}
    for split, rows in MELD_ROWS.items():
        csv_path, clip_dir = root / layout[split][0], root / layout[split][1]
        clip_dir.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\r\n")
            writer.writerow(meld.COLUMNS)
            writer.writerows(rows)
        exp = Expected(root, [])
        for row in rows:
            speaker, emotion, dia, utt = row[2], row[3], row[5], row[6]
            clip, utt_id = clip_dir / f"dia{dia}_utt{utt}.mp4", f"{split}_dia{dia}_utt{utt}"
            if (split, dia, utt) == ("dev", 110, 7):
                exp.skipped[meld.MISSING_KNOWN] = [utt_id]
                continue
            if (split, dia, utt) == ("train", 125, 3):
                clip.write_bytes(np.random.default_rng(125).bytes(3000))
            else:
                channels = MELD_CHANNELS.get((split, dia, utt), 1)
                _voice(clip, 1.0, 48000, seed=100 * dia + utt, channels=channels, silent_first=channels == 6)
            exp.records.append(Utterance(utt_id, str(clip), MELD_LABELS[emotion], speaker, split, "meld"))
        expected[split] = exp
    _voice(root / "train/train_splits/dia999_utt0.mp4", 1.0, 48000, seed=999)
    expected["train"].ignored[meld.NO_ROW] = ["train/dia999_utt0.mp4"]
    return expected


# ------------------------------------------------------------------------------------------- IEMOCAP
# dialog (without "Ses0N?_") -> raw labels of its turns F000, M000, F001, M001, ... Session N's scripted
# dialog has the first N labels of its list, so the sessions differ in size.
IEMOCAP_IMPRO = ["neu", "hap", "xxx", "ang", "exc", "fru"]
IEMOCAP_SCRIPT = ["sad", "oth", "neu", "sur", "ang"]
IEMOCAP_4CLASS = {"neu": "neutral", "hap": "happy", "exc": "happy", "ang": "angry", "sad": "sad"}
IEMOCAP_FULL = {"neu": "neutral", "hap": "happy", "exc": "excited", "ang": "angry", "sad": "sad",
                "fru": "frustrated", "sur": "surprise", "fea": "fear", "dis": "disgust", "oth": "other"}
_ANNOTATOR_LINES = ("C-E2:\tNeutral;\t()", "C-E3:\tNeutral; Frustration;\t()", "C-F1:\tNeutral;\t(curious)",
                    "A-E3:\tval 3; act 2; dom  2;\t()", "A-F1:\tval 3; act 2; dom  1;\t(mildly aggravated)")


def make_iemocap(tmp: Path) -> dict[str, Expected]:
    """IEMOCAP_full_release under `tmp`: Sessions 1-5, each with an improvised and a scripted dialog
    (`Ses0NF_impro01`, `Ses0NM_script01_1`), EmoEvaluation files with a % header, annotator lines and
    xxx/fru/oth/sur labels, Attribute/ Categorical/ Self-evaluation/ subfolders (not to be read), and a
    16 kHz mono wav for every turn. Keys: "4class" and "full"."""
    root = Path(tmp) / "IEMOCAP_full_release"
    expected = {protocol: Expected(root, []) for protocol in ("4class", "full")}
    for session in range(1, 6):
        evaluation = root / f"Session{session}" / "dialog" / "EmoEvaluation"
        for sub, text in (("Attribute", "{turn} :act 2; val 3;"), ("Categorical", "{turn} :Neutral state; ()"),
                          ("Self-evaluation", "{turn} :val 2; act 4; dom 3")):
            (evaluation / sub).mkdir(parents=True, exist_ok=True)
            (evaluation / sub / f"Ses0{session}F_impro01_e2.txt").write_text(
                text.format(turn=f"Ses0{session}F_impro01_F000") + "\n")
        for dialog, labels in ((f"Ses0{session}F_impro01", IEMOCAP_IMPRO),
                               (f"Ses0{session}M_script01_1", IEMOCAP_SCRIPT[:session])):
            lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
            for i, raw in enumerate(labels):
                turn = f"{dialog}_{'FM'[i % 2]}{i // 2:03d}"
                start = 2.5 * i + 0.2901
                lines += [f"[{start:.4f} - {start + 1.9456:.4f}]\t{turn}\t{raw}\t[2.5000, 3.0000, 2.5000]",
                          *_ANNOTATOR_LINES, ""]
                wav = root / f"Session{session}" / "sentences" / "wav" / dialog / f"{turn}.wav"
                _voice(wav, 0.6, 16000, seed=1000 * session + 10 * len(dialog) + i)
                speaker = turn[:5] + turn[-4]
                for protocol, mapping in (("4class", IEMOCAP_4CLASS), ("full", IEMOCAP_FULL)):
                    if raw in mapping:
                        expected[protocol].records.append(
                            Utterance(turn, str(wav), mapping[raw], speaker, f"Session{session}", "iemocap"))
                    else:
                        expected[protocol].skipped.setdefault(iemocap.not_used(raw, protocol), []).append(turn)
            (evaluation / f"{dialog}.txt").write_text("\n".join(lines) + "\n")
    return expected


# ------------------------------------------------------------------------------------------- RAVDESS
def make_ravdess(tmp: Path) -> dict[str, Expected]:
    """RAVDESS speech audio under `tmp`: Actor_01 and Actor_02, one file per emotion 01-08 (02 = calm),
    plus a song file (03-02-...) and a macOS metadata copy under __MACOSX/. Keys: calm "drop", "neutral"."""
    root = Path(tmp) / "RAVDESS"
    labels = {"01": "neutral", "03": "happy", "04": "sad", "05": "angry", "06": "fear", "07": "disgust",
              "08": "surprise"}
    expected = {calm: Expected(root, []) for calm in ("drop", "neutral")}
    for actor in ("01", "02"):
        for k, emotion in enumerate(["01", "02", "03", "04", "05", "06", "07", "08"]):
            intensity = "01" if emotion == "01" else "0" + str(1 + k % 2)
            stem = f"03-01-{emotion}-{intensity}-0{1 + k % 2}-0{1 + actor.count('2')}-{actor}"
            path = root / f"Actor_{actor}" / f"{stem}.wav"
            _voice(path, 0.4, 48000, seed=int(actor) * 10 + k)
            for calm, exp in expected.items():
                if emotion == "02" and calm == "drop":
                    exp.skipped.setdefault(ravdess.CALM_DROPPED, []).append(stem)
                else:
                    exp.records.append(Utterance(stem, str(path), labels.get(emotion, "neutral"),
                                                 f"Actor_{actor}", f"Actor_{actor}", "ravdess"))
    song = root / "Actor_01" / "03-02-03-01-01-01-01.wav"
    _voice(song, 0.4, 48000, seed=77)
    hidden = root / "__MACOSX" / "Actor_01" / "._03-01-01-01-01-01-01.wav"
    hidden.parent.mkdir(parents=True)
    hidden.write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    for exp in expected.values():
        exp.records.sort(key=lambda u: u.path)
        exp.ignored = {HIDDEN: [str(hidden)], ravdess.NOT_SPEECH: [song.name]}
    return expected


# --------------------------------------------------------------------------------------------- SAVEE
SAVEE_CODES = {"a01": "angry", "d01": "disgust", "f01": "fear", "h01": "happy", "n01": "neutral",
               "n02": "neutral", "sa01": "sad", "su01": "surprise"}


def make_savee(tmp: Path, flat: bool = False) -> Expected:
    """SAVEE under `tmp`: `AudioData/<DC|JE|JK|KL>/<code><nn>.wav`, or with flat=True one folder of
    `<speaker>_<code><nn>.wav` files; 8 clips per speaker (codes a, d, f, h, n x2, sa, su)."""
    root = Path(tmp) / ("SAVEE_flat" if flat else "SAVEE")
    exp = Expected(root, [])
    for s, speaker in enumerate(("DC", "JE", "JK", "KL")):
        for c, (code, label) in enumerate(SAVEE_CODES.items()):
            path = root / "ALL" / f"{speaker}_{code}.wav" if flat else root / "AudioData" / speaker / f"{code}.wav"
            _voice(path, 0.3, 44100, seed=10 * s + c)
            exp.records.append(Utterance(f"{speaker}_{code}", str(path), label, speaker, speaker, "savee"))
    exp.records.sort(key=lambda u: u.path)
    return exp


# ------------------------------------------------------------------------------------------- CREMA-D
CREMAD_NAMES = {"1001_DFA_ANG_XX": "angry", "1001_IEO_HAP_HI": "happy", "1001_IEO_SAD_LO": "sad",
                "1002_TIE_NEU_XX": "neutral", "1002_MTI_FEA_MD": "fear", "1091_WSI_DIS_HI": "disgust",
                "1091_ITS_ANG_LO": "angry"}


def make_cremad(tmp: Path) -> Expected:
    """CREMA-D under `tmp`: AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav, 7 clips of 3 actors."""
    root = Path(tmp) / "CREMA-D"
    exp = Expected(root, [])
    for k, (stem, label) in enumerate(CREMAD_NAMES.items()):
        path = root / "AudioWAV" / f"{stem}.wav"
        _voice(path, 0.4, 16000, seed=k)
        actor = stem[:4]
        exp.records.append(Utterance(stem, str(path), label, actor, actor, "cremad"))
    exp.records.sort(key=lambda u: u.path)
    return exp


# ---------------------------------------------------------------------------------------------- TESS
TESS_FOLDERS = {  # emotion token -> (OAF folder, YAF folder, label), folder names as the release spells them
    "angry": ("OAF_angry", "YAF_angry", "angry"), "disgust": ("OAF_disgust", "YAF_disgust", "disgust"),
    "fear": ("OAF_Fear", "YAF_fear", "fear"), "happy": ("OAF_happy", "YAF_happy", "happy"),
    "neutral": ("OAF_neutral", "YAF_neutral", "neutral"),
    "ps": ("OAF_Pleasant_surprise", "YAF_pleasant_surprised", "surprise"), "sad": ("OAF_Sad", "YAF_sad", "sad"),
}
TESS_WORDS = {"OAF": ("back", "bar"), "YAF": ("back",)}


def make_tess(tmp: Path, nested: bool = True) -> Expected:
    """TESS under `tmp`: `<speaker>_<word>_<emotion>.wav` (emotion ps = pleasant surprise), in one folder
    per speaker and emotion inside "TESS Toronto emotional speech set data/" (nested) or all in one
    folder; 21 clips (OAF says "back" and "bar", YAF "back")."""
    root = Path(tmp) / ("TESS" if nested else "TESS_flat")
    exp = Expected(root, [])
    for emotion, (oaf, yaf, label) in TESS_FOLDERS.items():
        for speaker, folder in (("OAF", oaf), ("YAF", yaf)):
            for word in TESS_WORDS[speaker]:
                stem = f"{speaker}_{word}_{emotion}"
                path = (root / "TESS Toronto emotional speech set data" / folder if nested else root) / f"{stem}.wav"
                _voice(path, 0.3, 24414, seed=len(exp.records))
                exp.records.append(Utterance(stem, str(path), label, speaker, speaker, "tess"))
    exp.records.sort(key=lambda u: u.path)
    return exp
