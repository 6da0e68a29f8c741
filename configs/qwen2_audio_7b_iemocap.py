"""EMO-RL on IEMOCAP (4 classes, leave-one-session-out): GRPO of Qwen2-Audio-7B-Instruct with ESR + ESWR.

Values marked (paper) are reported for EMO-RL (second-hand; launch/README.md lists them); every other value is ours.
Run one fold per job, fold k tests on Session k; report each fold and the mean of the five:

  python -m emorl_jax.train --config=configs/qwen2_audio_7b_iemocap.py --workdir=runs/iemocap_f1 \
    --config.data.fold=1 --config.data.data_dir=/data/IEMOCAP_full_release \
    --config.init.checkpoint=/ckpt/qwen2_audio_7b --config.tokenizer.path=/models/Qwen2-Audio-7B-Instruct

Start from a local Qwen2-Audio-7B-Instruct snapshot: `--config.init.hf_dir=DIR` reads its safetensors, or
convert it once (`python -m emorl_jax.convert`) and pass `--config.init.checkpoint=DIR`. Nothing is downloaded.
`tokenizer.path` must name the snapshot too (its tokenizer.json). launch/ has TPU and GPU scripts.

Hardware: the mesh below is FSDP over every chip, sized for a v5p-8 (4 chips x 95 GiB). Full fine-tuning keeps
fp32 params + fp32 AdamW moments + fp32 grads: 8.40e9 params x 16 B = 134 GB, 31.3 GiB per chip over 4 chips,
which is all of a v4-8's 32 GiB chips (nothing left for activations, KV cache or the reference policy): use
a v4-32 (or a v4-16, tight) there. On one 8-GPU node (H100 80 GB) the same mesh shards over the 8 GPUs.
"""

from emorl_jax.config import QWEN2_AUDIO_7B, base_run_config, model_config_dict


def get_config():
    c = base_run_config()
    # The published Qwen2-Audio-7B-Instruct shape. dtype bf16 compute (ours); param_dtype fp32 (ours): an lr of
    # 1e-6 changes a weight by far less than bf16's resolution (2^-8 relative), so bf16 master weights would
    # drop most updates. remat (ours): recompute each layer in the backward pass to fit activations.
    c.model = model_config_dict(QWEN2_AUDIO_7B.replace(dtype="bfloat16", param_dtype="float32", remat=True))
    # (data, fsdp, tensor): FSDP over all chips (ours). Batches are sharded over data x fsdp, so the prompts of a
    # micro-batch (rl.batch_size / rl.micro_batches = 8) and train.eval_batch_size (16) must be multiples of that
    # device count: fine for 4 TPU chips or 8 GPUs; on a v5p-32 or larger raise them, or shard some of the
    # model with tensor parallelism instead, e.g. --config.mesh.shape="(1,-1,4)".
    c.mesh.shape = (1, -1, 1)
    c.init.hf_dir = ""       # set on the command line: a local Qwen2-Audio-7B-Instruct snapshot
    c.init.checkpoint = ""   # or its orbax conversion (python -m emorl_jax.convert), faster to restore sharded
    c.tokenizer.path = ""    # set on the command line: the snapshot directory (tokenizer.json)

    c.data.dataset = "iemocap"
    c.data.labels = "iemocap4"    # neu, hap (+exc), ang, sad: the standard 4-class protocol
    c.data.fold = 1               # leave-one-session-out fold 1..5: --config.data.fold=N
    c.data.train_split = "train"  # sessions other than the fold's
    c.data.eval_split = "test"    # the fold's session
    c.data.max_seconds = 0.0      # no limit: the few turns over 30 s are cut to the 30 s window (as HF does)
    c.data.skip_bad_clips = False  # IEMOCAP has no known broken wav: fail loudly on one

    c.prompt_mode = "esr"  # explicit structured reasoning (paper)
    c.sft.steps = 0        # GRPO straight from the instruct model, no SFT warm-up (ours: none is described)

    c.rl.group_size = 6          # G (paper)
    c.rl.learning_rate = 1e-6    # (paper), full fine-tuning (implied by the paper)
    c.rl.batch_size = 16         # prompts per step, 96 completions (ours)
    c.rl.micro_batches = 2       # gradient accumulation, 8 prompts x 6 completions per pass (ours, memory)
    c.rl.steps = 275             # about one epoch of a fold's ~4400 training utterances (ours)
    c.rl.beta = 0.04             # KL weight (ours)
    c.rl.clip_eps = 0.2          # ratio clip epsilon (ours)
    c.rl.temperature = 1.0       # rollout sampling temperature (ours)
    c.rl.top_p = 1.0             # no nucleus truncation (ours)
    c.rl.top_k = 0               # no top-k truncation (ours)
    c.rl.max_new_tokens = 256    # max completion length (ours): room for the four ESR blocks
    c.rl.iterations = 1          # mu: one optimisation pass per batch of rollouts (ours)
    c.rl.loss_normalization = "sequence"  # per-completion mean, then mean over the group (paper's formula)
    c.rl.std_ddof = 0            # population std in the advantage (ours; TRL uses 1)

    # ESWR with Plutchik similarity and threshold gamma (paper). With gamma = 0.7 only 45-degree neighbours earn
    # partial credit, and no two IEMOCAP-4 labels are 45 degrees apart, so here ESWR equals exact match.
    c.reward.accuracy = "eswr"
    c.reward.similarity = "plutchik"
    c.reward.gamma = 0.7               # (paper)
    c.reward.alpha = 1.0               # partial-credit weight (ours: the paper's value is unknown)
    c.reward.alpha_schedule = "constant"  # (ours)
    c.reward.format_weight = 1.0       # total = format + ESWR, a plain sum (ours, as in R1-AQA)
    c.reward.accuracy_weight = 1.0

    c.optim.warmup_fraction = 0.03  # linear warm-up, then cosine decay (ours)
    c.optim.weight_decay = 0.0      # (ours)
    c.optim.grad_clip = 1.0         # global-norm clip (ours)

    c.train.log_every = 1
    c.train.checkpoint_every = 50   # (ours); keep the last 2
    c.train.keep_checkpoints = 2
    c.train.eval_batch_size = 16    # greedy decoding at evaluation (ours)
    return c
