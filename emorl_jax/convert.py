"""`python -m emorl_jax.convert`: HF Qwen2-Audio safetensors -> orbax params, or orbax -> HF safetensors.

  python -m emorl_jax.convert --hf_dir=Qwen/Qwen2-Audio-7B-Instruct --out=ckpt/qwen2_audio_7b [--param_dtype=bfloat16]
  python -m emorl_jax.convert --hf_dir=/models/Qwen2-Audio-7B-Instruct --out=ckpt/qwen2_audio_7b  # a local snapshot
  python -m emorl_jax.convert --orbax_dir=ckpt/qwen2_audio_7b --out=hf_export   # back to safetensors

--hf_dir is a local directory or a Hugging Face Hub id `org/name[@revision]`, fetched into the HF cache
(safetensors, json and tokenizer files only; HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE=1 are honoured).
"""

from __future__ import annotations

import time

from absl import app, flags

from emorl_jax import checkpoint, cli

FLAGS = flags.FLAGS
flags.DEFINE_string("hf_dir", None, "Hugging Face directory (config.json + *.safetensors (+ index)) or Hub id "
                    "org/name[@revision], e.g. Qwen/Qwen2-Audio-7B-Instruct")
flags.DEFINE_string("orbax_dir", None, "orbax checkpoint written by this tool (exports it to safetensors)")
flags.DEFINE_string("out", None, "output directory", required=True)
flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"], "dtype the params are stored in")
flags.DEFINE_integer("max_shard_gib", 5, "largest safetensors shard when exporting, GiB")


def main(argv):
    del argv
    if (FLAGS.hf_dir is None) == (FLAGS.orbax_dir is None):
        raise app.UsageError("give exactly one of --hf_dir (import) or --orbax_dir (export)")
    start = time.perf_counter()
    if FLAGS.hf_dir:
        model = checkpoint.from_hf(FLAGS.hf_dir, param_dtype=FLAGS.param_dtype)
        checkpoint.save(model, FLAGS.out)
    else:
        model = checkpoint.restore(FLAGS.orbax_dir)
        checkpoint.to_hf(model, FLAGS.out, max_shard_bytes=FLAGS.max_shard_gib * 2**30)
    print(f"wrote {FLAGS.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    cli.run(main)
