"""MAML-RL meta-gradients written in PyTorch, as people write them, against gmrl's `task` protocol.

Each function takes (task, rng): rng is a numpy Generator; task.sample returns NumPy episodes.
K inner steps θ_{k+1} = θ_k + α ∇L(θ_k) through `torch.autograd.grad(..., create_graph=True)`
(or False: the classic first-order bug), then the outer loss at θ_K on a fresh batch.
"""

import numpy as np
import torch

EPISODES = 64
torch.set_num_threads(1)


def _batch(task, theta, rng):
    episodes = task.sample(theta.detach().numpy(), EPISODES, rng)
    states = torch.as_tensor(episodes.states[:, :-1])
    actions = torch.as_tensor(episodes.actions)
    rewards = torch.as_tensor(episodes.rewards, dtype=torch.float64)
    return states, actions, rewards


def dice_loss(theta, batch, gamma):
    """DiCE: mean over episodes of Σ_t γ^t exp(c_t − c_t.detach()) r_t, c_t = Σ_{i≤t} log π."""
    states, actions, rewards = batch
    log_pi = torch.log_softmax(theta, dim=-1)[states, actions]
    cumulative = torch.cumsum(log_pi, dim=1)
    magic_box = torch.exp(cumulative - cumulative.detach())
    discounts = gamma ** torch.arange(rewards.shape[1], dtype=torch.float64)
    return (discounts * magic_box * rewards).sum(1).mean()


def reward_to_go_loss(theta, batch, gamma):
    """Vanilla policy-gradient surrogate Σ_t γ^t G_t log π(a_t|s_t), G_t the reward to go."""
    states, actions, rewards = batch
    log_pi = torch.log_softmax(theta, dim=-1)[states, actions]
    horizon = rewards.shape[1]
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=torch.float64)
    for t in reversed(range(horizon)):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    discounts = gamma ** torch.arange(horizon, dtype=torch.float64)
    return (discounts * returns * log_pi).sum(1).mean()


def _meta_gradient(task, rng, loss, create_graph=True):
    theta0 = torch.tensor(np.asarray(task.phi), dtype=torch.float64, requires_grad=True)
    theta = theta0
    for _ in range(task.steps):
        inner = loss(theta, _batch(task, theta, rng), task.gamma)
        (grad,) = torch.autograd.grad(inner, theta, create_graph=create_graph)
        theta = theta + task.lr * grad
    outer = loss(theta, _batch(task, theta, rng), task.gamma)
    (meta,) = torch.autograd.grad(outer, theta0)
    return meta.numpy()


def maml_dice(task, rng):
    return _meta_gradient(task, rng, dice_loss)


def maml_dice_first_order(task, rng):
    return _meta_gradient(task, rng, dice_loss, create_graph=False)


def maml_logprob(task, rng):
    return _meta_gradient(task, rng, reward_to_go_loss)


def maml_dice_halved(task, rng):
    return _meta_gradient(task, rng, dice_loss) / 2
