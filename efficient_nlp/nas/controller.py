"""The APS controller: a 2-layer LSTM policy over widths, REINFORCE, beam search.

Wang et al. 2020; docs/nas.md.  One step per searchable decision ``d``; its input is the embedding of the
previous action (a start token first), the one-hot decision index and the remaining budget
fraction ``(B - F_partial) / B`` where ``F_partial`` is the FLOPs of the decided prefix with every
later decision at its smallest width.  Decision ``d`` has its own linear head over its candidates
(logits of unused slots are masked out).  Reward ``R = Acc * (B(a) / B)^gamma`` with
``gamma = alpha`` if ``B(a) <= B`` else ``beta``; REINFORCE with a moving-average baseline and an
entropy bonus: ``loss = -mean((R - b) log pi(a)) - entropy_weight * mean(H)``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

NEG_INF = -1e9


class LSTMCell(nnx.Module):
    """``(h, c), x -> (h', c')``: one LSTM cell (gates i, f, g, o from one dense layer)."""

    def __init__(self, in_features: int, hidden: int, *, rngs: nnx.Rngs):
        self.hidden = hidden
        self.gates = nnx.Linear(in_features + hidden, 4 * hidden, rngs=rngs,
                                kernel_init=jax.nn.initializers.uniform(0.1))

    def __call__(self, carry, x):
        h, c = carry
        i, f, g, o = jnp.split(self.gates(jnp.concatenate([x, h], -1)), 4, axis=-1)
        c = jax.nn.sigmoid(f + 1.0) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return h, c


class Controller(nnx.Module):
    """Autoregressive policy over ``num_choices[d]`` candidates per decision ``d``."""

    def __init__(self, num_choices, *, hidden: int = 100, rngs: nnx.Rngs):
        self.num_choices = tuple(int(n) for n in num_choices)
        self.num_decisions = len(self.num_choices)
        self.max_choices = max(self.num_choices)
        self.hidden = int(hidden)
        self.embed = nnx.Embed(self.max_choices + 1, hidden, rngs=rngs)   # last row: start token
        in_dim = hidden + self.num_decisions + 1
        self.cell1 = LSTMCell(in_dim, hidden, rngs=rngs)
        self.cell2 = LSTMCell(hidden, hidden, rngs=rngs)
        self.heads = nnx.List([nnx.Linear(hidden, self.max_choices, rngs=rngs,
                                          kernel_init=jax.nn.initializers.uniform(0.1))
                               for _ in self.num_choices])

    def init_carry(self, n):
        z = jnp.zeros((n, self.hidden))
        return ((z, z), (z, z))

    def step(self, carry, prev, d: int, remaining):
        """One decision for a batch: ``prev`` [n] int (start token = max_choices), ``remaining``
        [n] float -> ``(carry, logits [n, max_choices])`` with invalid slots at -1e9."""
        n = prev.shape[0]
        onehot = jnp.broadcast_to(jax.nn.one_hot(d, self.num_decisions), (n, self.num_decisions))
        x = jnp.concatenate([self.embed(prev), onehot, remaining[:, None]], -1)
        c1 = self.cell1(carry[0], x)
        c2 = self.cell2(carry[1], c1[0])
        logits = self.heads[d](c2[0])
        valid = jnp.arange(self.max_choices) < self.num_choices[d]
        return (c1, c2), jnp.where(valid, logits, NEG_INF)


def _remaining(flops_model, budget, actions, d):
    if flops_model is None:
        return jnp.ones(actions.shape[:1])
    b = flops_model.max() if budget is None else budget
    return (b - flops_model.partial(actions, d)) / b


def _entropy(logits):
    logp = jax.nn.log_softmax(logits)
    return -jnp.sum(jnp.exp(logp) * logp, -1)


def sample(controller, key, n: int, *, flops_model=None, budget=None, greedy: bool = False):
    """``(actions [n, D] int32, log_prob [n], entropy [n])`` (entropy summed over decisions)."""
    carry = controller.init_carry(n)
    prev = jnp.full((n,), controller.max_choices, jnp.int32)
    actions = jnp.zeros((n, controller.num_decisions), jnp.int32)
    logp = jnp.zeros((n,))
    ent = jnp.zeros((n,))
    for d in range(controller.num_decisions):
        carry, logits = controller.step(carry, prev, d, _remaining(flops_model, budget, actions, d))
        a = (jnp.argmax(logits, -1) if greedy else
             jax.random.categorical(jax.random.fold_in(key, d), logits)).astype(jnp.int32)
        lp = jax.nn.log_softmax(logits)
        logp = logp + jnp.take_along_axis(lp, a[:, None], -1)[:, 0]
        ent = ent + _entropy(logits)
        actions = actions.at[:, d].set(a)
        prev = a
    return actions, logp, ent


def log_prob(controller, actions, *, flops_model=None, budget=None):
    """``(log pi(actions) [n], entropy [n])`` by teacher forcing ``actions [n, D]``."""
    actions = jnp.asarray(actions, jnp.int32)
    n = actions.shape[0]
    carry = controller.init_carry(n)
    prev = jnp.full((n,), controller.max_choices, jnp.int32)
    logp = jnp.zeros((n,))
    ent = jnp.zeros((n,))
    for d in range(controller.num_decisions):
        carry, logits = controller.step(carry, prev, d, _remaining(flops_model, budget, actions, d))
        lp = jax.nn.log_softmax(logits)
        logp = logp + jnp.take_along_axis(lp, actions[:, d:d + 1], -1)[:, 0]
        ent = ent + _entropy(logits)
        prev = actions[:, d]
    return logp, ent


def marginals(controller, key, n: int = 512, *, flops_model=None, budget=None):
    """``[D, max_choices]`` Monte-Carlo frequencies of each candidate per decision."""
    actions, _, _ = sample(controller, key, n, flops_model=flops_model, budget=budget)
    return jnp.mean(jax.nn.one_hot(actions, controller.max_choices), 0)


def reward(accuracy, flops, budget, *, alpha: float = 0.0, beta: float = -0.1):
    """``R = Acc * (B(a) / B)^gamma``, ``gamma = alpha`` if ``B(a) <= B`` else ``beta``;
    ``budget`` None means no constraint (``R = Acc``)."""
    if budget is None:
        return jnp.asarray(accuracy, jnp.float32)
    ratio = jnp.asarray(flops, jnp.float32) / budget
    gamma = jnp.where(ratio <= 1.0, alpha, beta)
    return accuracy * ratio ** gamma


def reinforce_loss(logp, entropy, rewards, baseline, entropy_weight: float = 4e-3):
    """Surrogate whose gradient is the REINFORCE estimate: ``-mean((R - b) log pi) - w mean(H)``."""
    advantage = jax.lax.stop_gradient(jnp.asarray(rewards) - baseline)
    return -jnp.mean(advantage * logp) - entropy_weight * jnp.mean(entropy)


def update_baseline(baseline, initialized, rewards, decay: float = 0.99):
    """Moving average ``b <- decay b + (1 - decay) mean(R)``; the first call sets ``b = mean(R)``."""
    r = jnp.mean(rewards)
    new = jnp.where(jnp.asarray(initialized) > 0, decay * baseline + (1.0 - decay) * r, r)
    return new, jnp.ones_like(initialized)


def beam_search(controller, top_n: int, *, beam_width: int | None = None, flops_model=None,
                budget=None):
    """The ``top_n`` architectures by log-likelihood: ``[(actions tuple, log_prob)]``, best first.

    Keeps the ``beam_width`` (default ``max(top_n, 64)``) most likely prefixes after every
    decision; exact whenever ``beam_width`` >= the number of prefixes before the last decision.
    """
    width = max(top_n, 64) if beam_width is None else max(int(beam_width), top_n)
    n_dec = controller.num_decisions
    beams = np.zeros((1, n_dec), np.int32)
    scores = np.zeros((1,))
    carry = controller.init_carry(1)
    prev = jnp.full((1,), controller.max_choices, jnp.int32)
    for d in range(n_dec):
        remaining = _remaining(flops_model, budget, jnp.asarray(beams), d)
        carry, logits = controller.step(carry, prev, d, remaining)
        lp = np.asarray(jax.nn.log_softmax(logits))[:, :controller.num_choices[d]]
        total = scores[:, None] + lp                                    # [beams, A_d]
        flat = np.argsort(-total, axis=None, kind="stable")[:width]
        src, act = np.unravel_index(flat, total.shape)
        beams = beams[src].copy()
        beams[:, d] = act
        scores = total[src, act]
        carry = jax.tree.map(lambda x: x[jnp.asarray(src)], carry)
        prev = jnp.asarray(act, jnp.int32)
    order = np.argsort(-scores, kind="stable")[:top_n]
    return [(tuple(int(a) for a in beams[k]), float(scores[k])) for k in order]
