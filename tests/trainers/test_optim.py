"""Each update rule against steps computed by hand on tiny float64 tensors."""
from __future__ import annotations

import math

import pytest
import torch

from trainers.optim import (GRAD_CLIP_NORM, OPTIMIZERS, OptimizerSpec, _registry,
                            clip_gradients, get_optimizer)

W0 = [[3.0, 4.0]]      # 2-D "layer", ||W|| = 5
G = [[0.6, 0.8]]       # ||G|| = 1, parallel to W
B0 = [1.0, -2.0]       # 1-D "bias"
GB = [0.5, 0.5]


def tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def run(name: str, hparams: dict, start: list, grads: list[list]) -> list:
    """Build `name` from the registry on one tensor and apply one step per gradient."""
    param = tensor(start)
    optimizer = get_optimizer(name).build([param], hparams)
    for grad in grads:
        param.grad = torch.tensor(grad, dtype=torch.float64)
        optimizer.step()
    return param.detach().tolist()


def close(actual, expected, tol=1e-9):
    flat_actual = torch.tensor(actual, dtype=torch.float64).flatten().tolist()
    flat_expected = torch.tensor(expected, dtype=torch.float64).flatten().tolist()
    assert flat_actual == pytest.approx(flat_expected, abs=tol)


# --- plain rules (torch's) through the registry's hyperparameter names -------------------

def test_sgd_with_l2_weight_decay():
    # w - 0.1 (g + 0.01 w): 1 - 0.1*0.51 = 0.949; 2 - 0.1*(-0.98) = 2.098
    close(run("sgd", {"learning_rate": 0.1, "weight_decay": 0.01}, [1.0, 2.0], [[0.5, -1.0]]),
          [0.949, 2.098])


def test_heavy_ball_momentum_two_steps():
    # v1 = g1 = (0.5, -1); w1 = (0.95, 2.1). v2 = 0.9 v1 + (1, 1) = (1.45, 0.1);
    # w2 = w1 - 0.1 v2 = (0.805, 2.09)
    close(run("momentum", {"learning_rate": 0.1, "momentum": 0.9}, [1.0, 2.0],
              [[0.5, -1.0], [1.0, 1.0]]), [0.805, 2.09])


def test_nesterov_two_steps():
    # step 1: v = g = (0.5, -1); d = g + 0.9 v = (0.95, -1.9); w = (0.905, 2.19)
    # step 2: v = (1.45, 0.1); d = (1, 1) + 0.9 v = (2.305, 1.09); w = (0.6745, 2.081)
    close(run("nesterov", {"learning_rate": 0.1, "momentum": 0.9}, [1.0, 2.0],
              [[0.5, -1.0], [1.0, 1.0]]), [0.6745, 2.081])


def test_adam_two_steps_with_bias_correction():
    # Step 1: m_hat = g, v_hat = g^2, so the step is lr * g / (|g| + eps) ~ lr * sign(g).
    close(run("adam", {"learning_rate": 0.1}, [1.0, 2.0], [[0.5, -1.0]]), [0.9, 2.1], tol=1e-8)
    # Step 2 written out per coordinate: g1 = (0.5, -1), g2 = (1, 1).
    expected = []
    for w1, g1, g2 in [(0.9, 0.5, 1.0), (2.1, -1.0, 1.0)]:
        m = 0.9 * 0.1 * g1 + 0.1 * g2
        v = 0.999 * 0.001 * g1 ** 2 + 0.001 * g2 ** 2
        m_hat, v_hat = m / (1 - 0.9 ** 2), v / (1 - 0.999 ** 2)
        expected.append(w1 - 0.1 * m_hat / (math.sqrt(v_hat) + 1e-8))
    close(run("adam", {"learning_rate": 0.1}, [1.0, 2.0], [[0.5, -1.0], [1.0, 1.0]]),
          expected, tol=1e-8)


def test_adamw_decouples_weight_decay():
    # w (1 - lr wd) - lr sign(g) = (0.99 - 0.1, 1.98 + 0.1)
    close(run("adamw", {"learning_rate": 0.1, "weight_decay": 0.1}, [1.0, 2.0], [[0.5, -1.0]]),
          [0.89, 2.08], tol=1e-8)


def test_adam_weight_decay_is_l2_in_the_gradient():
    # g + wd w = (0.5 + 0.1, -1 + 0.2) keeps its signs: an Adam first step is lr * sign.
    close(run("adam", {"learning_rate": 0.1, "weight_decay": 0.1}, [1.0, 2.0], [[0.5, -1.0]]),
          [0.9, 2.1], tol=1e-8)


# --- LARS -----------------------------------------------------------------------------------

def test_lars_two_steps_on_a_layer():
    # local lr = 0.001 * 5 / (1 + 0.01 * 5) = 0.005 / 1.05; g + wd w = 1.05 * G, so
    # v1 = 0.005 * G = (0.003, 0.004) and W1 = (2.997, 3.996), ||W1|| = 4.995.
    # Step 2: local lr = 0.004995 / (1 + 0.04995), g + wd w = 1.04995 * G, so the new term
    # is 0.004995 * G = (0.002997, 0.003996); v2 = 0.9 v1 + that = (0.005697, 0.007596).
    hp = {"learning_rate": 1.0, "weight_decay": 0.01}
    close(run("lars", hp, W0, [G]), [[2.997, 3.996]])
    close(run("lars", hp, W0, [G, G]), [[2.991303, 3.988404]])


def test_lars_reads_trust_coefficient():
    # 0.002 * 5 / 1 = 0.01: W - 0.01 G
    close(run("lars", {"learning_rate": 1.0, "trust_coefficient": 0.002}, W0, [G]),
          [[2.994, 3.992]])


def test_lars_excludes_1d_tensors_from_decay_and_adaptation():
    # plain momentum, lr inside the velocity: v1 = (0.5, 0.5), v2 = 0.9 v1 + g = (0.95, 0.95)
    hp = {"learning_rate": 1.0, "weight_decay": 0.01}
    close(run("lars", hp, B0, [GB]), [0.5, -2.5])
    close(run("lars", hp, B0, [GB, GB]), [-0.45, -3.45])


def test_lars_trust_ratio_is_one_when_a_norm_is_zero():
    hp = {"learning_rate": 0.1, "weight_decay": 0.01}
    # zero weights: W - 0.1 * (G + 0) = -(0.06, 0.08)
    close(run("lars", hp, [[0.0, 0.0]], [G]), [[-0.06, -0.08]])
    # zero gradient: W - 0.1 * (0 + 0.01 W) = (2.997, 3.996)
    close(run("lars", hp, W0, [[[0.0, 0.0]]]), [[2.997, 3.996]])


def test_lars_applies_to_each_layer_separately():
    layer, bias = tensor(W0), tensor(B0)
    optimizer = get_optimizer("lars").build([layer, bias], {"learning_rate": 1.0,
                                                            "weight_decay": 0.01})
    layer.grad, bias.grad = torch.tensor(G, dtype=torch.float64), torch.tensor(GB, dtype=torch.float64)
    optimizer.step()
    close(layer.detach().tolist(), [[2.997, 3.996]])
    close(bias.detach().tolist(), [0.5, -2.5])


# --- LAMB -----------------------------------------------------------------------------------

def test_lamb_first_step_on_a_layer():
    # eps 0: r = m_hat / sqrt(v_hat) = sign(G) = (1, 1); u = r + 0.01 W = (1.03, 1.04);
    # ||u|| = sqrt(2.1425) = 1.4637281168; ratio 5 / ||u|| = 3.4159349284;
    # W1 = W - 0.01 * 3.4159349284 * u
    hp = {"learning_rate": 0.01, "epsilon": 0.0}
    close(run("lamb", hp, W0, [G]), [[2.9648158702372145, 3.964474276744372]])


def _lamb_step(w, m, v, g, t, lr=0.01, eps=1e-6, wd=0.01):
    """One LAMB step on a 2-D layer written out with Python floats."""
    m = [0.9 * mi + 0.1 * gi for mi, gi in zip(m, g)]
    v = [0.999 * vi + 0.001 * gi * gi for vi, gi in zip(v, g)]
    r = [(mi / (1 - 0.9 ** t)) / (math.sqrt(vi / (1 - 0.999 ** t)) + eps) for mi, vi in zip(m, v)]
    u = [ri + wd * wi for ri, wi in zip(r, w)]
    ratio = math.hypot(*w) / math.hypot(*u)
    return [wi - lr * ratio * ui for wi, ui in zip(w, u)], m, v


def test_lamb_two_steps_with_bias_correction_and_default_epsilon():
    g2 = [0.3, -0.4]
    w1, m, v = _lamb_step(W0[0], [0.0, 0.0], [0.0, 0.0], G[0], t=1)
    w2, _, _ = _lamb_step(w1, m, v, g2, t=2)
    close(run("lamb", {"learning_rate": 0.01}, W0, [G, [g2]]), [w2])


def test_lamb_excludes_1d_tensors_from_decay_and_adaptation():
    # ratio 1, no decay: a bias-corrected Adam step, b - 0.01 * g / (|g| + 1e-6)
    close(run("lamb", {"learning_rate": 0.01, "weight_decay": 0.5}, B0, [GB]),
          [1.0 - 0.01 * 0.5 / 0.500001, -2.0 - 0.01 * 0.5 / 0.500001], tol=1e-12)


def test_lamb_trust_ratio_is_one_for_zero_weights():
    close(run("lamb", {"learning_rate": 0.01, "epsilon": 0.0}, [[0.0, 0.0]], [G]),
          [[-0.01, -0.01]])


def test_large_batch_defaults_match_the_papers():
    assert dict(get_optimizer("lamb").optional) == {
        "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-6, "weight_decay": 0.01}
    assert get_optimizer("lars").optional["trust_coefficient"] == 0.001
    assert get_optimizer("lars").optional["momentum"] == 0.9
    assert get_optimizer("adamw").optional["weight_decay"] == 0.01


def test_every_optimizer_takes_weight_decay():
    assert all("weight_decay" in spec.hparam_names for spec in OPTIMIZERS.values())


# --- gradient clipping -------------------------------------------------------------------

def _with_grads(*grads):
    params = [torch.zeros(len(g), dtype=torch.float64, requires_grad=True) for g in grads]
    for param, grad in zip(params, grads):
        param.grad = torch.tensor(grad, dtype=torch.float64)
    return params


def test_clip_gradients_scales_to_the_global_norm():
    params = _with_grads([3.0], [4.0])  # global norm 5
    norm = clip_gradients(params, 1.0)
    assert float(norm) == pytest.approx(5.0)
    close([p.grad.item() for p in params], [0.6, 0.8], tol=1e-6)


def test_clip_gradients_leaves_small_gradients_alone():
    params = _with_grads([0.3, 0.4])
    assert float(clip_gradients(params, 1.0)) == pytest.approx(0.5)
    close(params[0].grad.tolist(), [0.3, 0.4])


@pytest.mark.parametrize("max_norm", [None, 0.0])
def test_clip_gradients_off(max_norm):
    params = _with_grads([3.0, 4.0])
    assert clip_gradients(params, max_norm) is None
    close(params[0].grad.tolist(), [3.0, 4.0])


def test_grad_clip_norm_is_not_an_optimizer_hyperparameter():
    assert GRAD_CLIP_NORM == "grad_clip_norm"
    # the loop reads it; optimizers ignore it
    close(run("sgd", {"learning_rate": 0.1, GRAD_CLIP_NORM: 1e-9}, [1.0], [[1.0]]), [0.9])


# --- registry ------------------------------------------------------------------------------

def test_registry_is_read_only_and_names_the_choices():
    with pytest.raises(TypeError):
        OPTIMIZERS["mine"] = OPTIMIZERS["sgd"]  # type: ignore[index]
    with pytest.raises(TypeError):
        OPTIMIZERS["sgd"].optional["weight_decay"] = 1.0  # type: ignore[index]
    with pytest.raises(KeyError, match="adamw, lamb, lars"):
        get_optimizer("lion")


def test_duplicate_name_is_an_error():
    spec = OptimizerSpec(lambda params, hp: None, (), {})
    with pytest.raises(ValueError, match="duplicate optimizer name 'a'"):
        _registry([("a", spec), ("a", spec)])


def test_missing_hyperparameter_is_named():
    with pytest.raises(ValueError, match="momentum"):
        get_optimizer("momentum").build([tensor([1.0])], {"learning_rate": 0.1})


def test_resolve_fills_registry_defaults_and_keeps_only_what_the_optimizer_reads():
    assert get_optimizer("lars").resolve({"learning_rate": 0.1, "end_factor": 0.5}) == {
        "learning_rate": 0.1, "momentum": 0.9, "weight_decay": 0.0, "trust_coefficient": 0.001}
    assert get_optimizer("sgd").resolve({"learning_rate": 0.1, "momentum": 0.9}) == {
        "learning_rate": 0.1, "weight_decay": 0.0}
    assert get_optimizer("lars").build(torch.nn.Linear(2, 2).parameters(),
                                       {"learning_rate": 0.1}).param_groups[0]["momentum"] == 0.9


def test_validate_rejects_nesterov_without_momentum_and_what_torch_rejects():
    from trainers.optim import validate_hparams
    with pytest.raises(ValueError, match="optimizer 'nesterov': momentum must be > 0"):
        validate_hparams("nesterov", {"learning_rate": 0.1, "momentum": 0.0})
    with pytest.raises(ValueError, match="momentum must be > 0"):
        get_optimizer("nesterov").build([tensor([1.0])], {"learning_rate": 0.1, "momentum": 0.0})
    with pytest.raises(ValueError, match="optimizer 'momentum': Invalid momentum"):
        validate_hparams("momentum", {"learning_rate": 0.1, "momentum": -0.5})
    with pytest.raises(ValueError, match="optimizer 'adam': Invalid beta"):
        validate_hparams("adam", {"learning_rate": 0.1, "beta1": 1.0})
    assert validate_hparams("nesterov", {"learning_rate": 0.1, "momentum": 0.5}) == {
        "learning_rate": 0.1, "momentum": 0.5, "weight_decay": 0.0}
    assert validate_hparams("momentum", {"learning_rate": 0.1, "momentum": 0.0})["momentum"] == 0.0
