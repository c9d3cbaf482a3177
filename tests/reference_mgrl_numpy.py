"""An independent NumPy float64 implementation of tabular MGRL's exact meta-gradient (issue 20's formulas).

Written from the formulas, not from gmrl's JAX code: every quantity is a closed form evaluated with
complex arithmetic, and dJ_out/dη is taken by the complex-step method, ∂f/∂η_j = Im f(η + i h e_j)/h
with h = 1e-30 (Squire & Trapp 1998): no subtraction, so it is exact to rounding (~1e-16 relative)
for functions analytic in η, which these closed forms are (softmax, sigmoid, linear solves).
"""

from __future__ import annotations

import numpy as np

H = 1e-30


def softmax(x):
    z = np.exp(x - np.max(x.real, axis=-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def expected_step(P, R, s0, x, v, gamma, lam, alpha, beta):
    """(Δx [S, A], Δv [S]) of the infinite-horizon expected step."""
    S = R.shape[0]
    pi = softmax(x)
    P_pi = np.einsum("sa,sat->st", pi, P)
    r_pi = (pi * R).sum(-1)
    V_lam = np.linalg.solve(np.eye(S) - gamma * lam * P_pi, r_pi + gamma * (1 - lam) * P_pi @ v)
    Q_lam = R + gamma * np.einsum("sat,t->sa", P, (1 - lam) * v + lam * V_lam)
    d = np.linalg.solve((np.eye(S) - gamma * P_pi).T, np.eye(S)[s0])
    baseline = (pi * Q_lam).sum(-1)
    dx = alpha * d[:, None] * pi * (Q_lam - baseline[:, None])
    dv = beta * (1 - gamma) * d * (V_lam - v)
    return dx, dv


def finite_expected_step(P, R, s0, x, v, gamma, lam, alpha, beta, T):
    """The expectation of the sampled step over episodes of horizon T (bootstrap v(s_T)), by
    enumerating the time steps: Σ_t γ^t Σ_s Pr(s_t = s) E[A_t ∇log π(a_t|s_t) | s_t = s] etc."""
    S = R.shape[0]
    pi = softmax(x)
    P_pi = np.einsum("sa,sat->st", pi, P)
    r_pi = (pi * R).sum(-1)
    V = [v]  # V[n]: expected λ-return with n steps to go
    Q = [None]
    for _ in range(T):
        target = (1 - lam) * v + lam * V[-1]
        Q.append(R + gamma * np.einsum("sat,t->sa", P, target))
        V.append(r_pi + gamma * P_pi @ target)
    dx = np.zeros(x.shape, dtype=np.result_type(x, gamma))
    dv = np.zeros(v.shape, dtype=np.result_type(x, gamma))
    dist = np.eye(S)[s0].astype(dx.dtype)
    for t in range(T):
        n = T - t
        adv = Q[n] - (pi * Q[n]).sum(-1, keepdims=True)
        dx = dx + alpha * gamma**t * dist[:, None] * pi * adv
        dv = dv + beta * (1 - gamma) * gamma**t * dist * (V[n] - v)
        dist = dist @ P_pi
    return dx, dv


def true_return(P, R, gamma_out, s0, x):
    S = R.shape[0]
    pi = softmax(x)
    P_pi = np.einsum("sa,sat->st", pi, P)
    return np.linalg.solve(np.eye(S) - gamma_out * P_pi, (pi * R).sum(-1))[s0]


def final_learner(P, R, s0, eta, alpha, beta, K, horizon=None):
    x = np.zeros(R.shape, dtype=np.result_type(eta))
    v = np.zeros(R.shape[0], dtype=np.result_type(eta))
    gamma, lam = sigmoid(eta[0]), sigmoid(eta[1])
    for _ in range(K):
        if horizon is None:
            dx, dv = expected_step(P, R, s0, x, v, gamma, lam, alpha, beta)
        else:
            dx, dv = finite_expected_step(P, R, s0, x, v, gamma, lam, alpha, beta, horizon)
        x, v = x + dx, v + dv
    return x, v


def meta_objective(P, R, gamma_out, s0, eta, alpha, beta, K):
    """J_out(x_K(η)) after K infinite-horizon expected steps from (0, 0)."""
    x, _ = final_learner(P, R, s0, eta, alpha, beta, K)
    return true_return(P, R, gamma_out, s0, x)


def meta_gradient(P, R, gamma_out, s0, eta, alpha, beta, K):
    """dJ_out/dη [2] by the complex step."""
    eta = np.asarray(eta, np.float64)
    return np.array([meta_objective(P, R, gamma_out, s0, eta + 1j * H * np.eye(2)[j], alpha, beta, K).imag / H
                     for j in range(2)])


def step_jacobian(P, R, s0, x, v, eta, alpha, beta, T):
    """The Jacobian of the finite-horizon expected step Δ = (Δx, Δv) (flattened, S·A + S) in
    (x, v, η) (flattened, S·A + S + 2), by the complex step. [S·A + S, S·A + S + 2]."""
    S, A = R.shape
    point = np.concatenate([np.ravel(x), v, eta]).astype(np.float64)
    columns = []
    for j in range(point.size):
        z = point + 1j * H * np.eye(point.size)[j]
        xz, vz, ez = z[:S * A].reshape(S, A), z[S * A:S * A + S], z[S * A + S:]
        dx, dv = finite_expected_step(P, R, s0, xz, vz, sigmoid(ez[0]), sigmoid(ez[1]), alpha, beta, T)
        columns.append(np.concatenate([np.ravel(dx), dv]).imag / H)
    return np.stack(columns, 1)
