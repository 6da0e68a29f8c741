"""GRPO advantages and loss against a plain float64 numpy reference written from DESIGN.md §5.

Tolerances: the JAX code runs in float32. Against the float64 reference: the loss (loss_sum / denominator,
O(1)) and the metric means to rtol 1e-6 / atol 1e-7 (measured <= 4e-8 abs over 20 seeds), advantages to
1e-6 (measured <= 8.3e-7 abs, values up to ~2), gradients to rtol 1e-5 / atol 1e-7 (measured <= 3.7e-7 rel);
denominators exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emorl_jax.rl.grpo import group_advantages, grpo_loss, k3_kl, metric_means

N, T, G = 16, 12, 4


# ------------------------------------------------------------------------------------------ numpy reference
def ref_advantages(rewards, group_size, ddof=0, eps=1e-4):
    rewards = np.asarray(rewards, np.float64)
    adv, uniform = np.zeros_like(rewards), np.zeros(rewards.shape, bool)
    for start in range(0, len(rewards), group_size):
        r = rewards[start:start + group_size]
        if np.all(r == r[0]):
            uniform[start:start + group_size] = True
        else:
            adv[start:start + group_size] = (r - r.mean()) / (r.std(ddof=ddof) + eps)
    return adv, uniform


def ref_loss(logp, old, ref, adv, mask, weights, *, clip_eps, beta, normalization):
    """(loss_sum, denominator, metric sums, d loss_sum / d logp) in float64, one row and token at a time."""
    total, denom, grad = 0.0, 0.0, np.zeros(logp.shape)
    m = dict(tokens=0.0, rows=0.0, clipped_sum=0.0, kl_sum=0.0, neg_logp_sum=0.0, ratio_sum=0.0)
    for i in range(logp.shape[0]):
        toks = [t for t in range(logp.shape[1]) if mask[i, t] and weights[i]]
        if not toks:
            continue
        scale = 1.0 / len(toks) if normalization == "sequence" else 1.0
        a = adv[i]
        for t in toks:
            rho = np.exp(logp[i, t] - old[i, t])
            clipped = min(max(rho, 1 - clip_eps), 1 + clip_eps)
            x = ref[i, t] - logp[i, t]
            kl = np.exp(x) - x - 1
            total += -(min(rho * a, clipped * a) - beta * kl) * scale
            unclipped_active = rho * a <= clipped * a
            grad[i, t] = (-(rho * a if unclipped_active else 0.0) - beta * (np.exp(x) - 1.0)) * scale
            m["clipped_sum"] += not unclipped_active
            m["kl_sum"] += kl
            m["neg_logp_sum"] -= logp[i, t]
            m["ratio_sum"] += rho
        denom += 1.0 if normalization == "sequence" else len(toks)
        m["tokens"] += len(toks)
        m["rows"] += 1
    return total, denom, m, grad


def random_batch(seed, *, garbage=np.inf):
    """Random rollouts with uniform-reward groups, empty rows, dropped rows; masked slots hold `garbage`."""
    rng = np.random.default_rng(seed)
    logp = rng.uniform(-6.0, -0.01, (N, T))
    old = logp + rng.normal(0.0, 0.3, (N, T))  # ratios well outside [0.8, 1.2] too
    ref = logp + rng.normal(0.0, 0.5, (N, T))
    lengths = rng.integers(1, T + 1, N)
    lengths[[3, 9]] = 0  # fully masked rows
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    rewards = rng.choice([0.0, 0.854, 1.0, 1.854, 2.0], N)
    rewards[4:8] = 1.854  # an all-equal group
    weights = (rng.uniform(size=N) > 0.25).astype(np.float32)
    for x in (logp, old, ref):
        x[mask == 0] = garbage
    return dict(logp=logp, old=old, ref=ref, mask=mask, rewards=rewards, weights=weights)


def as_f32(b):
    return {k: jnp.asarray(v, jnp.float32) for k, v in b.items()}


@functools.partial(jax.jit, static_argnames=("normalization", "clip_eps", "beta"))
def jit_loss(logp, old, ref, adv, mask, weights, *, normalization, clip_eps=0.2, beta=0.04):
    return grpo_loss(logp, old, ref, adv, mask, clip_eps=clip_eps, beta=beta, normalization=normalization,
                     sequence_weights=weights)


# ------------------------------------------------------------------------------------------ advantages
@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("seed", range(4))
def test_group_advantages_match_reference(seed, ddof):
    rng = np.random.default_rng(seed)
    rewards = rng.choice([0.0, 0.1, 0.854, 1.0, 2.0], 24) + (seed % 2) * rng.normal(0, 1e-3, 24)
    rewards[6:12] = 0.1  # all-equal group whose float mean need not equal 0.1
    rewards[12:18] = 0.0
    adv, uniform = jax.jit(group_advantages, static_argnums=1, static_argnames="std_ddof")(
        jnp.asarray(rewards, jnp.float32), 6, std_ddof=ddof)
    want, want_uniform = ref_advantages(rewards.astype(np.float32), 6, ddof)
    np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(uniform), want_uniform)
    assert np.all(np.asarray(adv)[6:18] == 0.0)  # exactly zero, not 1e-8


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="12 rewards do not split into groups of 5"):
        group_advantages(jnp.zeros(12), 5)
    with pytest.raises(ValueError, match="std_ddof=1 needs 0 <= ddof < group_size=1"):
        group_advantages(jnp.zeros(12), 1, std_ddof=1)
    with pytest.raises(ValueError, match="rewards must be 1-D"):
        group_advantages(jnp.zeros((3, 4)), 4)


# ------------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize("normalization", ["sequence", "token"])
@pytest.mark.parametrize("seed", range(3))
def test_loss_and_gradient_match_reference(seed, normalization):
    b = random_batch(seed)
    adv = np.asarray(group_advantages(jnp.asarray(b["rewards"], jnp.float32), G)[0])
    f = as_f32(b)
    loss_sum, denom, metrics = jit_loss(f["logp"], f["old"], f["ref"], jnp.asarray(adv), f["mask"], f["weights"],
                                        normalization=normalization)
    clean = lambda x: np.where(b["mask"] > 0, np.float32(x), 0.0).astype(np.float64)  # the fp32-rounded inputs
    want_sum, want_denom, want_metrics, want_grad = ref_loss(
        clean(b["logp"]), clean(b["old"]), clean(b["ref"]), adv.astype(np.float64), b["mask"], b["weights"],
        clip_eps=0.2, beta=0.04, normalization=normalization)
    assert float(denom) == want_denom
    np.testing.assert_allclose(float(loss_sum) / float(denom), want_sum / want_denom, rtol=1e-6, atol=1e-7)
    for key, value in metric_means(want_metrics).items():
        np.testing.assert_allclose(metric_means(metrics)[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
    assert 0 < want_metrics["clipped_sum"] < want_metrics["tokens"]  # both branches exercised

    grad = jax.grad(lambda lp: jit_loss(lp, f["old"], f["ref"], jnp.asarray(adv), f["mask"], f["weights"],
                                        normalization=normalization)[0])(f["logp"])
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad))  # masked slots hold inf
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
    dropped = (b["mask"] == 0) | (b["weights"][:, None] == 0)
    assert np.all(grad[dropped] == 0.0)
    assert np.all(grad[~dropped] != 0.0)


@pytest.mark.parametrize("normalization", ["sequence", "token"])
@pytest.mark.parametrize("garbage", [np.nan, -np.inf, 1e30])
def test_masked_tokens_and_dropped_rows_get_exactly_zero_gradient(garbage, normalization):
    """Masked slots hold NaN / -inf / 1e30: loss and gradients (w.r.t. all three log-probs) stay finite and
    are exactly zero outside the kept tokens."""
    b = random_batch(7, garbage=garbage)
    f = as_f32(b)
    adv = group_advantages(f["rewards"], G)[0]

    def loss(lp, old, ref):
        s, d, _ = jit_loss(lp, old, ref, adv, f["mask"], f["weights"], normalization=normalization)
        return s / d

    value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(f["logp"], f["old"], f["ref"])
    assert np.isfinite(float(value))
    keep = (b["mask"] > 0) & (b["weights"][:, None] > 0)
    for g in grads:
        g = np.asarray(g)
        assert np.all(np.isfinite(g)) and np.all(g[~keep] == 0.0)


def test_uniform_group_feels_kl_unless_dropped():
    """The pitfall: A = 0 rows still get the KL gradient; dropping them (weight 0) removes it."""
    b = as_f32(random_batch(3, garbage=0.0))
    adv = jnp.zeros(N)
    ones = jnp.ones(N)
    grad = lambda w: np.asarray(jax.grad(lambda lp: jit_loss(lp, b["old"], b["ref"], adv, b["mask"], w,
                                                             normalization="sequence")[0])(b["logp"]))
    assert np.abs(grad(ones)).sum() > 0
    assert np.all(grad(jnp.zeros(N)) == 0.0)


@pytest.mark.parametrize("model", ["logps", "shared"])
@pytest.mark.parametrize("normalization", ["sequence", "token"])
def test_gradient_accumulation_equals_full_batch(normalization, model):
    """4 micro-batches of 4 rows: sum(loss_sum), sum(denominator), sum(grad loss_sum) / total denominator
    equal the full batch's loss and gradient, w.r.t. the log-probs and w.r.t. a parameter shared by all rows."""
    b = as_f32(random_batch(11, garbage=0.0))
    adv = group_advantages(b["rewards"], G)[0]
    rng = np.random.default_rng(0)
    features = jnp.asarray(rng.normal(size=(N, T, 5)), jnp.float32)
    if model == "logps":
        params, logps_of = b["logp"], lambda p, rows: p[rows]
    else:
        params, logps_of = jnp.asarray(rng.normal(size=5) * 0.3, jnp.float32), \
            lambda p, rows: -jax.nn.softplus(features[rows] @ p)

    def loss_sum(p, rows):
        s, d, m = jit_loss(logps_of(p, rows), b["old"][rows], b["ref"][rows], adv[rows], b["mask"][rows],
                           b["weights"][rows], normalization=normalization)
        return s, (d, m)

    def mean_loss(p):
        s, (d, _) = loss_sum(p, np.arange(N))
        return s / d

    s, (d, m) = loss_sum(params, np.arange(N))
    full_grad = jax.grad(mean_loss)(params)
    total_s, total_d, total_g, sums = 0.0, 0.0, jnp.zeros_like(params), None
    for rows in np.split(np.arange(N), 4):
        (s_mb, (d_mb, m_mb)), g_mb = jax.value_and_grad(loss_sum, has_aux=True)(params, rows)
        total_s, total_d, total_g = total_s + s_mb, total_d + d_mb, total_g + g_mb
        sums = m_mb if sums is None else jax.tree.map(jnp.add, sums, m_mb)
    assert float(total_d) == float(d) > 0
    np.testing.assert_allclose(float(total_s / total_d), float(s / d), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(total_g / total_d), np.asarray(full_grad), rtol=1e-6, atol=1e-6)
    for key, value in metric_means(sums).items():
        np.testing.assert_allclose(value, metric_means(m)[key], rtol=1e-6, atol=1e-6, err_msg=key)


def test_metric_means():
    sums = {"tokens": 4.0, "rows": 2.0, "clipped_sum": 1.0, "kl_sum": 0.2, "neg_logp_sum": 6.0, "ratio_sum": 4.4}
    assert metric_means(sums) == pytest.approx({"clip_fraction": 0.25, "kl": 0.05, "entropy_proxy": 1.5,
                                                "ratio": 1.1, "kept_tokens": 4.0, "kept_rows": 2.0})
    assert metric_means({**sums, "tokens": 0.0})["kl"] == 0.0


def test_loss_errors():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="normalization must be one of"):
        grpo_loss(x, x, x, jnp.zeros(2), x, normalization="batch")
    with pytest.raises(ValueError, match="must share one"):
        grpo_loss(x, jnp.zeros((2, 4)), x, jnp.zeros(2), x)
    with pytest.raises(ValueError, match=r"advantages must be \[N\]"):
        grpo_loss(x, x, x, jnp.zeros(3), x)
    with pytest.raises(ValueError, match=r"sequence_weights must be \[N\]"):
        grpo_loss(x, x, x, jnp.zeros(2), x, sequence_weights=jnp.ones(3))


# ------------------------------------------------------------------------------------------ k3 KL
ADVERSARIAL = np.array([0.0, 1e-8, -1e-8, 1e-6, -1e-6, 1e-4, -1e-4, 1e-3, -1e-3, 0.01, -0.01, 0.5, -0.5, 1.0, -1.0,
                        30.0, -30.0, 80.0, -80.0, -1e4])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_k3_kl_is_nonnegative_in_floating_point(dtype):
    rng = np.random.default_rng(0)
    mags = np.concatenate([np.logspace(-40, 1.9, 20000), rng.uniform(0, 60, 20000)])
    x = np.concatenate([ADVERSARIAL, mags, -mags])
    logp = rng.uniform(-20.0, 0.0, x.size)
    lp, rf = jnp.asarray(logp, dtype), jnp.asarray(logp + x, dtype)
    for fn in (k3_kl, jax.jit(k3_kl)):
        d = np.asarray(fn(lp, rf).astype(jnp.float32), np.float64)
        assert np.all(d >= 0.0), x[d < 0][:5]
    # The same differences fed directly (ref - logp = x exactly), against the float64 value.
    xs = jnp.asarray(x, dtype)
    x_rounded = np.asarray(xs.astype(jnp.float32), np.float64)
    d = np.asarray(jax.jit(k3_kl)(jnp.zeros_like(xs), xs).astype(jnp.float32), np.float64)
    assert np.all(d >= 0.0)
    exact = np.expm1(x_rounded) - x_rounded
    tol = 2 * float(jnp.finfo(dtype).eps) * (np.abs(np.expm1(x_rounded)) + np.abs(x_rounded))
    assert np.all(np.abs(d - exact) <= tol)
    # The naive form cancels below zero on the same inputs: the test has teeth.
    naive = np.asarray((jnp.exp(xs) - xs - 1).astype(jnp.float32))
    assert np.any(naive < 0)


def test_kl_metric_nonnegative_with_bf16_inputs():
    b = random_batch(5, garbage=0.0)
    tiny = b["logp"] + np.where(np.arange(T) % 2, 1e-8, -1e-8)  # ref within rounding of logp
    f = {k: jnp.asarray(v, jnp.bfloat16) for k, v in dict(logp=b["logp"], ref=tiny, mask=b["mask"]).items()}
    _, _, m = grpo_loss(f["logp"], f["logp"], f["ref"], jnp.ones(N, jnp.bfloat16), f["mask"])
    assert float(m["kl_sum"]) >= 0.0 and m["kl_sum"].dtype == jnp.float32
