"""`python -m emorl_jax.data.tfds_builders --corpus=meld --manual_dir=/data/MELD.Raw --data_dir=~/tensorflow_datasets`

Builds `emorl_speech/<corpus>` and prints its splits and what was skipped.
"""

from __future__ import annotations

import json

from absl import app, flags, logging

from emorl_jax.data.tfds_builders.emorl_speech import CONFIGS, build

_CORPUS = flags.DEFINE_enum("corpus", None, [c.name for c in CONFIGS], "Corpus config to build.", required=True)
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "The extracted release of the corpus.", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data_dir to write to.", required=True)
_SKIP = flags.DEFINE_bool("skip_bad_clips", False, "Skip (and count) clips that fail to decode instead of failing.")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.INFO)
    builder = build(_CORPUS.value, manual_dir=_MANUAL_DIR.value, data_dir=_DATA_DIR.value,
                    skip_bad_clips=_SKIP.value)
    print(f"{builder.info.full_name} in {builder.data_dir}")
    for name, split in builder.info.splits.items():
        print(f"  {name}: {split.num_examples} examples")
    metadata = builder.info.metadata
    print(f"skipped {metadata['num_skipped']} (bad clips {metadata['num_bad_clips']}):")
    print(json.dumps(metadata["skipped"], indent=2))


if __name__ == "__main__":
    app.run(main)
