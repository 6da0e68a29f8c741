"""Model configuration: frozen dataclasses built from an ml_collections ConfigDict or a HF config.json."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from emorl_jax.errors import ConfigError

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "splash", "splash_interpret")  # see emorl_jax/models/attention.py
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class AudioEncoderConfig:
    """Qwen2-Audio audio tower (Whisper-style). A window of 2*max_source_positions mel frames."""

    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    num_mel_bins: int = 128
    max_source_positions: int = 1500
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02  # std of the random init of the linear layers (HF `init_std`; random models only)

    @property
    def num_frames(self) -> int:
        """Mel frames in one audio window (3000 = 30 s for Qwen2-Audio)."""
        return 2 * self.max_source_positions

    @property
    def num_embeddings(self) -> int:
        """Audio embeddings one full window yields after conv stride 2 and avg-pool 2 (750)."""
        return self.max_source_positions // 2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Qwen2 decoder."""

    vocab_size: int = 156032
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02  # std of the random init of linear layers and embeddings (HF; random models)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class AudioLMConfig:
    """Encoder + projector + decoder, plus compute/param dtypes and the audio placeholder id."""

    audio: AudioEncoderConfig = AudioEncoderConfig()
    text: TextConfig = TextConfig()
    audio_token_index: int = 151646
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"
    remat: bool = False  # rematerialise each layer in the backward pass (saves activation memory)
    attention: str = "xla"  # xla | cudnn (NVIDIA GPU) | splash (TPU Pallas) | splash_interpret; models/attention.py

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"model.attention={self.attention!r}; expected one of {ATTENTION_IMPLEMENTATIONS}")
        if self.attention == "cudnn" and self.dtype not in ("bfloat16", "float16"):
            raise ConfigError(f"model.attention=cudnn runs cuDNN's fused attention, which needs model.dtype "
                              f"bfloat16 or float16, not {self.dtype}")

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return DTYPES[self.param_dtype]

    def replace(self, **kw) -> AudioLMConfig:
        return dataclasses.replace(self, **kw)


def _pick(cls, values: Mapping[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def from_hf_config(hf: Mapping[str, Any], *, dtype: str = "float32", param_dtype: str = "float32") -> AudioLMConfig:
    """Reads a Qwen2-Audio `config.json` dict (transformers 4.x `rope_theta` or 5.x `rope_parameters`)."""
    if hf.get("model_type") != "qwen2_audio":
        raise ValueError(f"config.json: model_type is {hf.get('model_type')!r}, expected 'qwen2_audio'")
    text = dict(hf["text_config"])
    if text.get("use_sliding_window"):
        raise ValueError("config.json: text_config.use_sliding_window=true is not supported")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"config.json: rope scaling {rope} is not supported")
    text.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
    audio = _pick(AudioEncoderConfig, hf["audio_config"])
    return AudioLMConfig(
        audio=audio,
        text=_pick(TextConfig, text),
        audio_token_index=hf.get("audio_token_index", hf.get("audio_token_id", 151646)),
        dtype=dtype,
        param_dtype=param_dtype,
    )


def to_hf_config(cfg: AudioLMConfig) -> dict[str, Any]:
    """The inverse of `from_hf_config`: a config.json dict transformers' Qwen2AudioConfig accepts."""
    text = dataclasses.asdict(cfg.text)
    text.update(model_type="qwen2", hidden_act="silu", use_sliding_window=False)
    audio = dataclasses.asdict(cfg.audio)
    del audio["layer_norm_eps"]
    audio.update(model_type="qwen2_audio_encoder", activation_function="gelu", scale_embedding=False)
    return {
        "architectures": ["Qwen2AudioForConditionalGeneration"],
        "model_type": "qwen2_audio",
        "audio_token_index": cfg.audio_token_index,
        "audio_config": audio,
        "text_config": text,
        "tie_word_embeddings": cfg.text.tie_word_embeddings,
    }


def from_config_dict(model: Mapping[str, Any]) -> AudioLMConfig:
    """Builds the model config from the `model` ConfigDict of a configs/*.py file."""
    model = dict(model)
    audio = _pick(AudioEncoderConfig, dict(model.pop("audio")))
    text = _pick(TextConfig, dict(model.pop("text")))
    return AudioLMConfig(audio=audio, text=text, **{k: v for k, v in model.items() if k in
                                                   {"audio_token_index", "dtype", "param_dtype", "remat",
                                                    "attention"}})


def model_config_dict(cfg: AudioLMConfig):
    """The `model` ConfigDict for configs/*.py files (the inverse of `from_config_dict`)."""
    import ml_collections

    d = dataclasses.asdict(cfg)
    return ml_collections.ConfigDict(d)


# Qwen2-Audio-7B-Instruct as published (config.json of Qwen/Qwen2-Audio-7B-Instruct).
QWEN2_AUDIO_7B = AudioLMConfig(
    audio=AudioEncoderConfig(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                             num_mel_bins=128, max_source_positions=1500),
    text=TextConfig(vocab_size=156032, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                    max_position_embeddings=8192, tie_word_embeddings=False),
    audio_token_index=151646,
)

# A tiny model for tests and CPU runs: a 4 s audio window (400 mel frames -> 100 audio embeddings), same code
# path. vocab_size and audio_token_index are set from the tokenizer a run trains.
TINY = AudioLMConfig(
    audio=AudioEncoderConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                             num_mel_bins=80, max_source_positions=200),
    text=TextConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                    max_position_embeddings=1024, tie_word_embeddings=True),
    audio_token_index=5,
    dtype="float32",
)


def base_run_config():
    """Every key a training/eval run reads, with defaults. configs/*.py start from this and override.

    Values marked (paper) are reported for EMO-RL; the rest are our defaults (DESIGN.md §5).
    """
    import ml_collections

    c = ml_collections.ConfigDict()
    c.model = model_config_dict(TINY)
    c.mesh = ml_collections.ConfigDict({
        "shape": (1, -1, 1),      # (data, fsdp, tensor); -1 = the rest
        "strict_sharding": False,  # a state leaf over 1 MiB replicated on every device: warning, or error if True
        # Activation sharding constraints (sharding.constrain) in every program. False lets XLA propagate
        # shardings alone: needed on fake multi-device CPU meshes, where XLA:CPU (jax 0.10.2) can deadlock in a
        # collective rendezvous running an update with constraints (one device thread at all-gather 94, the
        # other at 5, then an abort); seen in about half the runs of the 2-device resume test.
        "activation_constraints": True,
    })
    c.init = ml_collections.ConfigDict({
        "hf_dir": "",        # HF Qwen2-Audio dir or Hub id org/name[@revision] to start from (safetensors)
        "checkpoint": "",    # or an orbax checkpoint written by `python -m emorl_jax.convert`
        "seed": 0,           # random init when both are empty (tiny models)
    })
    c.tokenizer = ml_collections.ConfigDict({
        "path": "",          # tokenizer.json dir/file or SentencePiece .model; "" = train a SentencePiece model
        "vocab_size": 512,   # when training one
    })
    c.data = ml_collections.ConfigDict({
        "dataset": "synthetic",  # meld | iemocap | ravdess | savee | cremad | tess | synthetic | manifest
        "data_dir": "",          # corpus root (manual_dir layout), manifest path, or "" = <workdir>/data
        "labels": "meld",        # label set name (emotions.label_set)
        "train_split": "train",
        "eval_split": "test",
        "fold": 0,               # IEMOCAP leave-one-session-out fold (1-5); 0 = not IEMOCAP
        "bucket_multiple": 32,   # prompts (without length_buckets) and SFT targets are padded to multiples of it
        "length_buckets": (),    # prompt lengths to left-pad each batch to (the smallest that fits; a longer
                                 # prompt is an error naming the clip); () = round up to bucket_multiple
        "skip_bad_clips": False,
        "worker_count": 0,
        "max_seconds": 0.0,      # clips longer than this are bad clips; 0 = no limit (longer clips are cut to
                                 # the model's audio window, as Whisper and Qwen2-Audio's processor do)
        # synthetic corpus
        "synthetic_per_class": 60,
        "synthetic_speakers": 6,
        "synthetic_seed": 0,
        "synthetic_priors": "balanced",  # balanced | meld: MELD's class priors per split (synthetic.MELD_PRIORS)
    })
    c.lora = ml_collections.ConfigDict({
        "rank": 0,           # 0 = full fine-tuning (the paper's, implied); > 0 trains LoRA adapters only
        "alpha": 16.0,
        "targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    })
    c.prompt_mode = "esr"  # ir | eur | esr (DESIGN §5)
    c.sft = ml_collections.ConfigDict({
        "steps": 0, "batch_size": 8, "learning_rate": 1e-3, "micro_batches": 1,
        "from_run": "",      # a run directory whose SFT result (grpo_start, tokenizer.model) GRPO starts from
                             # instead of running SFT here: GRPO variants branched from one SFT checkpoint
    })
    c.rl = ml_collections.ConfigDict({
        "steps": 100,
        "batch_size": 4,             # prompts per step
        "group_size": 6,             # G (paper, second-hand)
        "learning_rate": 1e-6,       # (paper, second-hand)
        "beta": 0.04,                # KL weight (ours)
        "clip_eps": 0.2,             # (ours)
        "temperature": 1.0, "top_p": 1.0, "top_k": 0,
        "max_new_tokens": 256,
        "iterations": 1,             # mu: optimisation passes per batch of rollouts
        "micro_batches": 1,          # splits prompts: rollouts, log-prob passes and the update (accumulated)
        "loss_normalization": "sequence",  # sequence (paper) | token
        "std_ddof": 0,
        "skip_uniform_groups": True,  # groups whose rewards all equal give no gradient (no KL pull either)
        "mask_truncated": True,       # completions without EOS give no gradient
        # Log-prob passes project onto the vocabulary this many entries at a time (policy.head_logps): the fp32
        # logits [rows, N, V] are never whole (7B: 7.7 GB at 48 x 256 x 156032). 0 = all at once.
        "logps_chunk": 16384,
        "top_p_candidates": 1024,     # top-p picks its nucleus among this many top logits (exact fallback)
    })
    c.reward = ml_collections.ConfigDict({
        "accuracy": "eswr",          # eswr | binary (ablation)
        "similarity": "plutchik",    # plutchik | circumplex | path to a JSON matrix
        "gamma": 0.7, "alpha": 1.0, "alpha_schedule": "constant",  # constant | linear_decay
        "format_weight": 1.0, "accuracy_weight": 1.0,
    })
    c.optim = ml_collections.ConfigDict({
        "warmup_fraction": 0.03, "weight_decay": 0.0, "b1": 0.9, "b2": 0.999, "grad_clip": 1.0,
        "mu_dtype": "",    # Adam's first moment dtype ("bfloat16" halves it); "" = the param dtype
        "offload": False,  # optimizer state in host memory (pinned_host), brought to the devices per update
    })
    c.train = ml_collections.ConfigDict({
        "seed": 0, "log_every": 1, "checkpoint_every": 50, "keep_checkpoints": 2, "eval_batch_size": 16,
    })
    return c


def bundled_configs_dir() -> Path:
    """The run configs shipped with the package: `emorl_jax/configs/` in an installed wheel, else the checkout's
    top-level `configs/` (an editable install or a checkout on sys.path)."""
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


def config_path(path_or_name: str | os.PathLike) -> Path:
    """A config file: an existing path as given, or a bundled config by name ("tiny_synthetic")."""
    path = Path(path_or_name)
    if path.exists() or path.suffix == ".py" or len(path.parts) > 1:
        return path
    bundled = bundled_configs_dir() / f"{path}.py"
    if not bundled.is_file():
        names = sorted(p.stem for p in bundled_configs_dir().glob("*.py") if not p.name.startswith("_"))
        raise ConfigError(f"{path_or_name}: no such config file, nor a bundled config ({', '.join(names)})")
    return bundled


def load_run_config(path_or_name: str | os.PathLike, *overrides: str):
    """A run config exactly as `--config=path --config.key=value ...` gives it on a CLI (for notebooks and
    scripts). `path_or_name`: a configs/*.py path or a bundled config's name ("tiny_synthetic"; `config_path`).
    Overrides are "key=value" or "--config.key=value" strings, parsed by ml_collections."""
    from absl import flags
    from ml_collections import config_flags

    path = config_path(path_or_name)
    argv = ["prog", f"--config={path}", *(o if o.startswith("--config.") else f"--config.{o}" for o in overrides)]
    values = flags.FlagValues()  # config_flags reads the overrides from sys_argv, as it reads sys.argv on a CLI
    config_flags.DEFINE_config_file("config", default=None, flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return values.config


def qwen2_audio_7b_run_config():
    """EMO-RL's GRPO of Qwen2-Audio-7B-Instruct: the settings the IEMOCAP and MELD configs share.

    Values marked (paper) are reported for EMO-RL (second-hand); every other value is ours. Hardware: FSDP over
    every chip, sized for a v5p-8 (4 chips x 95 GiB). Full fine-tuning keeps fp32 params + fp32 AdamW moments
    + fp32 grads: 8.40e9 params x 16 B = 134 GB, 31.3 GiB per chip over 4 chips, all of a v4-8's 32 GiB chips:
    use a v4-32 there. On one 8-GPU node (H100 80 GB) the same mesh shards over the 8 GPUs.
    """
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
    c.init.hf_dir = ""       # set on the command line: Qwen/Qwen2-Audio-7B-Instruct (Hub id) or a local snapshot
    c.init.checkpoint = ""   # or its orbax conversion (python -m emorl_jax.convert), faster to restore sharded
    c.tokenizer.path = ""    # set on the command line: the same Hub id or snapshot directory (tokenizer.json)

    # Two prompt-length buckets (ours): each GRPO/eval batch is left-padded to 384 or 1024 tokens, so the sampler,
    # the log-prob pass and the update each compile twice (a 7B compile costs minutes per shape). The longest
    # prompt is a full 30 s window: 750 <|AUDIO|> + 27 template tokens (system turn 11, "<|im_start|>user\nAudio
    # 1: " 8, <|audio_bos|>/<|audio_eos|>/"\n" 3, "<|im_end|>\n<|im_start|>assistant\n" 5) + the ESR
    # instruction: at least one Qwen2 token per pre-tokenizer piece (127 for MELD's 7 labels, 121 for IEMOCAP's
    # 4), at most ~190 if long words split (no Qwen2 vocabulary here to count exactly; tests/test_pipeline.py
    # checks both bounds): 898-970 tokens, over 896, so 1024 = 8 x 128. Clips are ~3-5 s on average, and 384
    # holds any clip up to 6.5 s (9.4 s with the lower count): length-sorted windows fill it with most batches,
    # whose prompt part then costs 384 tokens instead of 1024 in the prefill and every log-prob pass, and whose
    # audio encoder runs over at most ~940 of the window's 3000 mel frames.
    c.data.length_buckets = (384, 1024)

    c.prompt_mode = "esr"  # explicit structured reasoning (paper)
    c.sft.steps = 0        # GRPO straight from the instruct model, no SFT warm-up (ours: none is described)

    c.rl.group_size = 6          # G (paper)
    c.rl.learning_rate = 1e-6    # (paper), full fine-tuning (implied by the paper)
    c.rl.batch_size = 16         # prompts per step, 96 completions (ours)
    c.rl.micro_batches = 2       # gradient accumulation, 8 prompts x 6 completions per pass (ours, memory)
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
    # partial credit (fear/surprise, surprise/sad, sad/disgust, disgust/angry).
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
