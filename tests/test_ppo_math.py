"""PPO math and KL controllers, against values computed here independently
(plain loops / numpy), never by calling the code under test for the expected numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from services.trainer.learner.kl_control import AdaptiveKLController, FixedKLController
from services.trainer.learner.ppo import (
    compute_advantages,
    compute_rewards,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_loss,
)

T = torch.tensor


def _whiten_np(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    sel = x[mask > 0]
    return (x - sel.mean()) / math.sqrt(sel.var(ddof=1) + 1e-8)


# --- masked statistics ----------------------------------------------------------------------
def test_masked_mean_var_whiten() -> None:
    x = np.array([[1.0, 2.0, 3.0, 100.0], [4.0, -1.0, 0.5, 7.0]])
    m = np.array([[1, 1, 1, 0], [1, 1, 0, 1]], dtype=float)
    sel = x[m > 0]
    xt, mt = T(x), T(m)
    assert float(masked_mean(xt, mt)) == pytest.approx(sel.mean())
    assert masked_mean(xt, mt, axis=1).tolist() == pytest.approx([2.0, 10.0 / 3.0])
    assert float(masked_var(xt, mt)) == pytest.approx(sel.var(ddof=1))  # unbiased, as TRL
    assert float(masked_var(xt, mt, unbiased=False)) == pytest.approx(sel.var())
    white = masked_whiten(xt, mt).numpy()
    np.testing.assert_allclose(white[m > 0], _whiten_np(x, m)[m > 0], rtol=1e-6)
    kept = masked_whiten(xt, mt, shift_mean=False).numpy()
    np.testing.assert_allclose(kept[m > 0], (_whiten_np(x, m) + sel.mean())[m > 0], rtol=1e-6)
    with pytest.raises(ValueError, match="one unmasked"):
        masked_var(xt, T([[1.0, 0, 0, 0], [0, 0, 0, 0]]))


# --- GAE --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.5)])
def test_gae_with_mask(gamma: float, lam: float) -> None:
    values = np.array([[0.5, -0.2, 0.3, 9.0], [0.1, 0.4, -0.6, 0.2]])
    rewards = np.array([[0.0, 0.1, 1.5, 7.0], [-0.3, 0.0, 0.2, 2.0]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=float)

    expected_adv = np.zeros_like(values)
    for b in range(2):
        v, r = values[b] * mask[b], rewards[b] * mask[b]
        gae = 0.0
        for t in reversed(range(4)):
            next_v = v[t + 1] if t + 1 < 4 else 0.0
            delta = r[t] + gamma * next_v - v[t]
            gae = delta + gamma * lam * gae
            expected_adv[b, t] = gae
    expected_returns = expected_adv + values * mask

    out_values, adv, returns = compute_advantages(T(values), T(rewards), T(mask), gamma, lam)
    np.testing.assert_allclose(out_values.numpy(), values * mask)
    np.testing.assert_allclose(returns.numpy()[mask > 0], expected_returns[mask > 0], rtol=1e-6)
    whitened = _whiten_np(expected_adv, mask)
    np.testing.assert_allclose(adv.numpy()[mask > 0], whitened[mask > 0], rtol=1e-5)


# --- losses ------------------------------------------------------------------------------------
def test_clipped_policy_and_value_losses() -> None:
    eps, eps_v, vf_coef = 0.2, 0.2, 0.1
    ratios = [0.5, 0.9, 1.1, 1.5, 1.3, 2.0]  # inside and outside [0.8, 1.2]
    adv = [1.0, -1.0, 1.0, -1.0, 1.0, 0.7]
    mask = [1, 1, 1, 1, 1, 0]
    old_lp = [-1.0, -2.0, -0.5, -3.0, -1.2, -0.1]
    new_lp = [o + math.log(r) for o, r in zip(old_lp, ratios, strict=True)]
    values = [0.0, 1.0, -1.0, 0.5, 0.2, 0.0]
    vpreds = [0.1, 1.5, -1.6, 0.45, 0.9, 3.0]  # moves of 0.1, 0.5, -0.6, -0.05, 0.7
    returns = [1.0, 0.0, -2.0, 0.4, 0.0, 1.0]

    pg, pg_clip, vf, vf_clip = [], [], [], []
    for i in range(5):  # unmasked entries only
        r, a = ratios[i], adv[i]
        unclipped, clipped = -a * r, -a * min(max(r, 1 - eps), 1 + eps)
        pg.append(max(unclipped, clipped))
        pg_clip.append(clipped > unclipped)
        v_c = min(max(vpreds[i], values[i] - eps_v), values[i] + eps_v)
        l1, l2 = (vpreds[i] - returns[i]) ** 2, (v_c - returns[i]) ** 2
        vf.append(max(l1, l2))
        vf_clip.append(l2 > l1)
    expected_pg = sum(pg) / 5
    expected_vf = 0.5 * sum(vf) / 5

    rows = [T([x]) for x in (old_lp, values, new_lp, vpreds, mask, adv, returns)]
    pg_loss, vf_scaled, stats = ppo_loss(
        *rows, cliprange=eps, cliprange_value=eps_v, vf_coef=vf_coef
    )
    assert float(pg_loss) == pytest.approx(expected_pg, rel=1e-5)
    assert float(vf_scaled) == pytest.approx(vf_coef * expected_vf, rel=1e-5)
    assert float(stats["loss/value"]) == pytest.approx(expected_vf, rel=1e-5)  # unscaled, as TRL
    assert float(stats["loss/total"]) == pytest.approx(expected_pg + vf_coef * expected_vf, 1e-5)
    assert float(stats["policy/clipfrac"]) == pytest.approx(sum(pg_clip) / 5)
    assert float(stats["val/clipfrac"]) == pytest.approx(sum(vf_clip) / 5)
    diffs = [math.log(r) for r in ratios[:5]]
    assert float(stats["policy/approxkl"]) == pytest.approx(0.5 * sum(d * d for d in diffs) / 5)
    assert float(stats["policy/policykl"]) == pytest.approx(-sum(diffs) / 5, rel=1e-5)
    assert float(stats["policy/ratio"]) == pytest.approx(sum(ratios[:5]) / 5, rel=1e-5)
    assert float(stats["policy/skipped"]) == 0.0
    assert 0 < sum(pg_clip) < 5 and 0 < sum(vf_clip) < 5  # the case mixes both sides

    # The ratio guard zeroes both losses and flags the mini-batch.
    pg0, vf0, st0 = ppo_loss(*rows, eps, eps_v, vf_coef, ratio_threshold=1.0)
    assert float(pg0) == 0.0 and float(vf0) == 0.0 and float(st0["policy/skipped"]) == 1.0


# --- KL penalties and rewards -------------------------------------------------------------------
def test_kl_penalty_modes() -> None:
    lp = np.array([[-1.0, -0.5, -2.0]])
    ref = np.array([[-1.5, -0.5, -1.0]])
    d = lp - ref
    torch_lp, torch_ref = T(lp), T(ref)
    np.testing.assert_allclose(kl_penalty("kl", torch_lp, torch_ref).numpy(), d)
    np.testing.assert_allclose(kl_penalty("abs", torch_lp, torch_ref).numpy(), np.abs(d))
    np.testing.assert_allclose(kl_penalty("mse", torch_lp, torch_ref).numpy(), 0.5 * d**2)

    rng = np.random.default_rng(0)
    logits, ref_logits = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
    expected = np.zeros((2, 3))
    for b in range(2):
        for t in range(3):
            p = np.exp(logits[b, t]) / np.exp(logits[b, t]).sum()
            q = np.exp(ref_logits[b, t]) / np.exp(ref_logits[b, t]).sum()
            expected[b, t] = float((p * (np.log(p) - np.log(q))).sum())
    full = kl_penalty(
        "full", torch.log_softmax(T(logits), -1), torch.log_softmax(T(ref_logits), -1)
    )
    np.testing.assert_allclose(full.numpy(), expected, rtol=1e-6)
    assert (full >= 0).all()
    with pytest.raises(ValueError, match="unknown kl_penalty"):
        kl_penalty("l2", torch_lp, torch_ref)


def test_compute_rewards_score_at_last_token() -> None:
    lp = np.array([[-1.0, -2.0, -0.5, -0.1], [-0.3, -0.2, -0.9, -1.1]])
    ref = np.array([[-1.2, -1.0, -0.5, -3.0], [-0.3, -0.7, -0.4, -1.0]])
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=float)
    scores, beta = [2.0, -1.0], 0.3
    kl = lp - ref
    expected = -beta * kl
    expected[0, 1] += 2.0  # row 0's last response token is position 1
    expected[1, 3] += -1.0
    rewards, non_score, kls = compute_rewards(T(scores), T(lp), T(ref), T(mask), beta, "kl")
    np.testing.assert_allclose(rewards.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(non_score.numpy(), -beta * kl, rtol=1e-6)
    np.testing.assert_allclose(kls.numpy(), kl, rtol=1e-6)
    _, _, abs_kls = compute_rewards(T(scores), T(lp), T(ref), T(mask), beta, "abs")
    np.testing.assert_allclose(abs_kls.numpy(), np.abs(kl), rtol=1e-6)


# --- KL controllers ----------------------------------------------------------------------------
def test_adaptive_kl_controller_by_hand() -> None:
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    expected = 0.2
    for current, n in [(9.0, 4), (3.0, 4), (6.6, 100), (6.0, 256)]:
        error = min(max(current / 6.0 - 1, -0.2), 0.2)
        expected *= 1 + error * n / 10000
        ctl.update(current, n)
        assert ctl.value == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.2 * 1.00008 * 0.99992 * 1.001)

    other = AdaptiveKLController(1.0, 1.0, 1.0)
    other.load_state_dict(ctl.state_dict())
    assert (other.value, other.target, other.horizon) == (ctl.value, 6.0, 10000.0)
    with pytest.raises(ValueError, match="adap_kl_ctrl"):
        FixedKLController(0.1).load_state_dict(ctl.state_dict())


def test_fixed_kl_controller() -> None:
    ctl = FixedKLController(0.2)
    for current in (100.0, -5.0, 0.0):
        ctl.update(current, 128)
    assert ctl.value == 0.2
    restored = FixedKLController(0.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == 0.2
