"""Compilation count of a 20-step tiny GRPO loop: every jitted function compiles once, nothing recompiles after
the first step.

Params live on a mesh of the visible devices, placed as `emorl_jax.train` places them. Each step: rollouts
(jitted sampler) -> a host reward on the sampled tokens (the fraction of even token ids) -> group advantages
(jitted `group_advantages`) -> old-policy and reference log-probs (one jitted log-prob function) -> the jitted
GRPO update. Backend compilations are counted with a `jax.monitoring` listener on
'/jax/core/compile/backend_compile_duration' (one event per XLA compilation, named after the function).
Exits with status 1 if anything compiles after step 1 or a loop function compiles more than once.

    python benchmarks/compiles.py [--quick] [--steps 20]
"""

from __future__ import annotations

import collections
import functools
import sys
import time

import common  # noqa: I001  (puts the repo on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emorl_jax.models.audio_lm import AudioLM
from emorl_jax.models.lora import split_trainable
from emorl_jax.rl.grpo import group_advantages
from emorl_jax.rl.sampler import SamplingParams, make_sampler, rollout_keys
from emorl_jax.rl.steps import init_train_state, make_grpo_update, make_logps_fn, make_optimizer
from emorl_jax.sharding import make_mesh, param_shardings

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
LOOP_FUNCTIONS = ("sample", "logps", "grpo_update", "group_advantages")  # the loop's own jitted functions


class CompileCounter:
    """Counts XLA compilations per function name while `enabled`."""

    def __init__(self):
        self.counts: collections.Counter[str] = collections.Counter()
        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kw) -> None:
        if event == COMPILE_EVENT:
            name = kw.get("fun_name", "?")
            self.counts[name[4:-1] if name.startswith("jit(") else name] += 1
            self.seconds += duration

    def take(self) -> tuple[collections.Counter[str], float]:
        out = (self.counts, self.seconds)
        self.counts, self.seconds = collections.Counter(), 0.0
        return out


def main():
    args = common.parse_args(__doc__.splitlines()[0],
                             lambda p: p.add_argument("--steps", type=int, default=20, help="GRPO steps"))
    if args.quick:
        args.steps = min(args.steps, 2)
    prompts, group, new = (2, 2, 8) if args.quick else (4, 8, 32)
    cfg = common.BENCH
    print(common.machine_info())
    print(f"setup: {args.steps} GRPO steps, {prompts} prompts x G={group}, {new} new tokens, tiny model")
    counter = CompileCounter()

    mesh = make_mesh((1, -1, 1))
    graphdef, params, frozen = split_trainable(AudioLM(cfg, rngs=nnx.Rngs(0)), lora=False)
    params = jax.device_put(params, param_shardings(params, mesh))  # as emorl_jax.train places them
    frozen = jax.device_put(frozen, param_shardings(frozen, mesh))
    ref_params = jax.tree.map(jnp.copy, params)
    tx = make_optimizer(learning_rate=1e-3, total_steps=args.steps)
    state, shardings = init_train_state(tx, params, mesh)
    sample = make_sampler(graphdef, group_size=group, eos_ids=(1,), pad_id=0,
                          params=SamplingParams(max_new_tokens=new, temperature=1.0))
    logps = make_logps_fn(graphdef, group_size=group)
    update = make_grpo_update(graphdef, tx, group_size=group, clip_eps=0.2, beta=0.04, normalization="sequence",
                              state_shardings=shardings)
    advantages = jax.jit(functools.partial(group_advantages, group_size=group))
    prompt = common.audio_prompts(cfg, prompts)
    counter.take()  # set-up (model init, optimizer init) is not part of the loop

    per_step, first, rest, seconds = [], None, collections.Counter(), []
    for step in range(args.steps):
        start = time.perf_counter()
        keys = rollout_keys(jax.random.fold_in(jax.random.key(0), step), prompts, group)
        out = sample((state.params, frozen), *(prompt[k] for k in ("prompt_ids", "prompt_mask", "input_features",
                                                                  "feature_mask")), keys)
        tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
        rewards = ((tokens % 2 == 0) * mask).sum(1) / np.maximum(mask.sum(1), 1)  # host reward
        adv, uniform = advantages(jnp.asarray(rewards, jnp.float32))
        batch = {**prompt, "completions": out.tokens, "completion_mask": out.mask, "advantages": adv,
                 "weights": (~uniform).astype(jnp.float32)}
        # Both from the same dict: a dict that already holds "old_logps" is another pytree, hence another compile.
        old, ref = logps(state.params, frozen, batch), logps(ref_params, frozen, batch)
        batch.update(old_logps=old, ref_logps=ref)
        state, metrics = update(state, frozen, batch)
        jax.block_until_ready(metrics["loss"])
        seconds.append(time.perf_counter() - start)
        counts, _ = counter.take()
        per_step.append(sum(counts.values()))
        if step == 0:
            first = counts
        else:
            rest += counts

    print(f"step 1: {sum(first.values())} compilations ({seconds[0]:.1f} s): "
          + ", ".join(f"{k} x{v}" for k, v in sorted(first.items())))
    listed = (": " + ", ".join(f"{k} x{v}" for k, v in sorted(rest.items()))) if rest else ""
    print(f"steps 2-{args.steps}: {sum(rest.values())} compilations{listed}; "
          f"median step {np.median(seconds[1:]) * 1e3:.0f} ms")
    print(f"compilations per step: {per_step}")
    loop_counts = [first[name] + rest[name] for name in LOOP_FUNCTIONS]
    print("loop functions: " + ", ".join(f"{n} compiled {c}x" for n, c in zip(LOOP_FUNCTIONS, loop_counts)))
    common.report(f"compilations per jitted loop function over {args.steps} steps (max)", max(loop_counts), 1.0,
                  "reference 1 = compiled once")
    common.report(f"compilations in all {args.steps} steps", sum(first.values()) + sum(rest.values()),
                  sum(first.values()), "reference = step 1 alone, i.e. no recompiles")
    if rest or max(loop_counts) != 1:
        print("FAIL: recompilation after the first step", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
