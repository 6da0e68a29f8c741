"""tensorflow-datasets builders of the emotional-speech corpora (`emorl_speech/<corpus>`; see emorl_speech.py).

Build: `build("meld", manual_dir=".../MELD.Raw", data_dir=...)` or
`python -m emorl_jax.data.tfds_builders --corpus=meld --manual_dir=... --data_dir=...`.
Read (no TensorFlow, no import of this package needed): `tfds.data_source("emorl_speech/meld", data_dir=...)`.
"""

from emorl_jax.data.tfds_builders.emorl_speech import (
    BAD_AUDIO, CONFIGS, FULL_SPLIT, CorpusConfig, EmorlSpeech, build, corpus_config)

__all__ = ["BAD_AUDIO", "CONFIGS", "FULL_SPLIT", "CorpusConfig", "EmorlSpeech", "build", "corpus_config"]
