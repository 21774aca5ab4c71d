"""One CQL update's losses and gradients from our code and from d3rlpy's, on the same batch, the
same parameters and the same noise (issue #46: "a second computation of the losses on the same
batch from both is the fastest test").

    python -m studies.cql_peer.same_batch            # needs .venv-peer (README.md beside this file)

Our half (this environment): an N=1 CQL member of `algorithms/off2on_balanced.py` at the Off2OnRL
authors' settings, its target critics and temperature moved off their initial values so that the
comparison sees them, and a random batch with some terminal transitions. Its parameters, the
batch and every random draw one update makes (the policy's Gaussian noise at s for the actor
step, at s and s' for CQL's 10 + 10 sampled actions, the 10 uniform actions) go to the peer half
(`--peer IN OUT`, run in .venv-peer), which loads them into d3rlpy's CQL, replays the same draws
(torch's `Normal.rsample` and `Tensor.uniform_` patched to return them) and computes d3rlpy's own
critic loss, actor loss and temperature loss with their gradients. Our update runs with the same
draws (our `tanh_gaussian`, `jax.random.uniform` patched) and plain SGD at lr 1 in place of Adam, so
its parameter change is minus its gradient.

Where the two codes differ by design the comparison says so: d3rlpy's deterministic backup takes
the target critics at the policy's mean action at s' (ours samples one, as the CQL authors' code
does; matched here by giving ours zero noise there, and the difference measured separately), and
d3rlpy's temperature loss is -alpha (log pi + |A|) where ours is -log(alpha) (log pi + |A|).
Writes `results/same_batch.md`.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
PEER_PYTHON = REPO / ".venv-peer" / "bin" / "python"
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
# the authors' CQL settings (studies/cql_peer/peer_cql.py's AUTHORS_SETTINGS) on small networks
SIZES = {"obs_dim": 11, "action_dim": 3, "hidden": 32, "batch": 64, "n_actions": 10}
LOG_ALPHA = float(np.log(0.7))  # the temperature, off its initial 1 so that it is seen
RTOL = 1e-4  # float32 on both sides, different summation orders


# ------------------------------------------------------------------ the peer half (.venv-peer)


def peer_losses(inputs: dict) -> dict:
    """d3rlpy's CQL losses and gradients for `inputs` (parameters in torch layout, batch, noise)."""
    import d3rlpy
    import torch

    hidden, n = int(inputs["hidden"]), int(inputs["n_actions"])
    obs_dim, action_dim = int(inputs["obs_dim"]), int(inputs["action_dim"])
    config = d3rlpy.algos.CQLConfig(
        actor_learning_rate=1e-4, critic_learning_rate=3e-4, temp_learning_rate=1e-4,
        alpha_learning_rate=0.0, initial_temperature=float(np.exp(inputs["log_alpha"])),
        initial_alpha=1.0, alpha_threshold=0.0, conservative_weight=5.0, n_action_samples=n,
        soft_q_backup=False, gamma=0.99, tau=5e-3, n_critics=2, batch_size=int(inputs["batch"]),
        actor_encoder_factory=d3rlpy.models.VectorEncoderFactory([hidden, hidden]),
        critic_encoder_factory=d3rlpy.models.VectorEncoderFactory([hidden, hidden]),
    )  # fmt: skip
    cql = config.create(device="cpu:0")
    cql.create_impl((obs_dim,), action_dim)
    impl, modules = cql.impl, cql.impl.modules
    with torch.no_grad():
        for prefix, module in (("policy", modules.policy), ("q", modules.q_funcs),
                               ("q_target", modules.targ_q_funcs)):  # fmt: skip
            for name, param in module.named_parameters():
                param.copy_(torch.as_tensor(inputs[f"{prefix}.{name}"]))
    as_t = lambda key: torch.as_tensor(inputs[key], dtype=torch.float32)  # noqa: E731
    batch_size = inputs["rewards"].shape[0]
    column = lambda key: as_t(key).reshape(batch_size, 1)  # noqa: E731
    batch = d3rlpy.torch_utility.TorchMiniBatch(
        observations=as_t("observations"), actions=as_t("actions"), rewards=column("rewards"),
        next_observations=as_t("next_observations"), next_actions=as_t("actions"),
        returns_to_go=torch.zeros(batch_size, 1), terminals=column("terminals"),
        intervals=torch.ones(batch_size, 1), device="cpu:0",
    )  # fmt: skip

    gaussian = []  # the noise of each rsample call, in call order

    def rsample(self, sample_shape=torch.Size()):  # noqa: B008 - torch's own default
        eps = torch.as_tensor(gaussian.pop(0), dtype=torch.float32)
        return self.loc + self.scale * eps.reshape(*sample_shape, *self.loc.shape)

    def uniform_(self, low=0.0, high=1.0):  # d3rlpy's uniform actions: [B * n, A], row b * n + j
        uniform = inputs["uniform"]  # ours: [n, B, A]
        return self.copy_(torch.as_tensor(uniform.transpose(1, 0, 2).reshape(self.shape)))

    normal_rsample, tensor_uniform = torch.distributions.Normal.rsample, torch.Tensor.uniform_
    torch.distributions.Normal.rsample, torch.Tensor.uniform_ = rsample, uniform_
    try:
        # critic: d3rlpy's target (the mean action at s'), TD error and conservative term
        gaussian[:] = [inputs["eps_curr"], inputs["eps_cnext"]]
        target = impl.compute_target(batch)
        critic = impl.compute_critic_loss(batch, target)
        critic.critic_loss.backward()
        out = {
            "critic_loss": critic.critic_loss.item(),
            "bellman_loss": (critic.critic_loss - critic.conservative_loss).item(),
            "conservative_loss": critic.conservative_loss.item(),
            "q_data": modules.q_funcs[0](batch.observations, batch.actions).q_value.mean().item(),
        }
        for name, param in modules.q_funcs.named_parameters():
            out[f"grad.q.{name}"] = param.grad.numpy().copy()
        # temperature: d3rlpy's own update_temp on the actor step's log-probabilities (it steps
        # the temperature, so it runs on a copy of the sample and the value is restored after)
        gaussian[:] = [inputs["eps_pi"]]
        dist = d3rlpy.models.torch.build_squashed_gaussian_distribution(
            modules.policy(batch.observations)
        )
        _, log_prob = dist.sample_with_log_prob()
        log_temp = d3rlpy.models.torch.get_parameter(modules.log_temp)
        saved = log_temp.detach().clone()
        out["temperature_loss"] = impl.update_temp(log_prob.detach()).item()
        out["grad.log_alpha"] = log_temp.grad.numpy().copy().reshape(())
        with torch.no_grad():
            log_temp.copy_(saved)
        object.__setattr__(modules, "temp_optim", None)  # the actor loss without another step
        # actor: d3rlpy's SAC actor loss at the same (pre-update) critics
        gaussian[:] = [inputs["eps_pi"]]
        modules.policy.zero_grad()
        actor = impl.compute_actor_loss(batch, modules.policy(batch.observations))
        actor.actor_loss.backward()
        out["actor_loss"] = actor.actor_loss.item()
        for name, param in modules.policy.named_parameters():
            out[f"grad.policy.{name}"] = param.grad.numpy().copy()
    finally:
        torch.distributions.Normal.rsample, torch.Tensor.uniform_ = normal_rsample, tensor_uniform
    return out


# ------------------------------------------------------------------ our half


def torch_layout(actor_params, critic_params, target_params) -> dict:
    """Our N=1 member's parameters under d3rlpy's names (torch Linear weights are [out, in])."""
    out = {}

    def linear(prefix, dense):
        out[f"{prefix}.weight"] = np.asarray(dense["kernel"]).T
        out[f"{prefix}.bias"] = np.asarray(dense["bias"]).reshape(-1)

    a = actor_params["params"]
    linear("policy._encoder._layers.0", a["MLP_0"]["Dense_0"])
    linear("policy._encoder._layers.2", a["MLP_0"]["Dense_1"])
    linear("policy._mu", a["Dense_0"])
    linear("policy._logstd", a["Dense_1"])
    for prefix, params in (("q", critic_params), ("q_target", target_params)):
        c = params["params"]
        for i in range(2):  # the twin critics: the leading axis of each leaf
            twin = {k: v[i] for k, v in c["MLP_0"]["Dense_0"].items()}
            linear(f"{prefix}.{i}._encoder._layers.0", twin)
            twin = {k: v[i] for k, v in c["MLP_0"]["Dense_1"].items()}
            linear(f"{prefix}.{i}._encoder._layers.2", twin)
            linear(f"{prefix}.{i}._fc", {k: v[i] for k, v in c["Dense_0"].items()})
    return out


def our_update(seed: int = 0, sampled_backup: bool = False) -> tuple[dict, dict, dict]:
    """(inputs for the peer, our losses, our gradients in torch layout) of one CQL update."""
    import jax
    import jax.numpy as jnp
    import optax

    from algorithms import off2on_balanced as o2o

    s = SIZES
    args = o2o.Args(ensemble_size=1, hidden_dims=(s["hidden"], s["hidden"]), batch_size=s["batch"],
                    cql_n_actions=s["n_actions"], bc_steps=0)  # fmt: skip
    actor = o2o.TanhGaussianPolicy(s["action_dim"], args.hidden_dims)
    critic = o2o.Critic(args.hidden_dims)
    key = jax.random.PRNGKey(seed)
    members = o2o.create_cql_members(args, actor, critic, s["obs_dim"], s["action_dim"], key)
    shift = jax.tree_util.tree_map(lambda x: x + 0.05, members.critic_target)
    sgd = optax.sgd(1.0)  # the parameter change of one step is minus the gradient
    members = members.replace(
        critic_target=shift,
        actor=members.actor.replace(tx=sgd, opt_state=sgd.init(members.actor.params)),
        critic=members.critic.replace(tx=sgd, opt_state=sgd.init(members.critic.params)),
        log_alpha=members.log_alpha.replace(
            params={"v": jnp.full((1,), LOG_ALPHA, jnp.float32)}, tx=sgd,
            opt_state=sgd.init({"v": jnp.zeros((1,))}),
        ),
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    b, a, n = s["batch"], s["action_dim"], s["n_actions"]
    batch = {
        "observations": rng.normal(size=(b, s["obs_dim"])).astype(np.float32),
        "actions": rng.uniform(-0.99, 0.99, (b, a)).astype(np.float32),
        "rewards": rng.normal(size=b).astype(np.float32),
        "next_observations": rng.normal(size=(b, s["obs_dim"])).astype(np.float32),
        "terminals": (rng.uniform(size=b) < 0.2).astype(np.float32),
    }
    noise = {
        "eps_pi": rng.normal(size=(b, a)).astype(np.float32),
        "eps_next": rng.normal(size=(b, a)).astype(np.float32),
        "eps_curr": rng.normal(size=(n, b, a)).astype(np.float32),
        "eps_cnext": rng.normal(size=(n, b, a)).astype(np.float32),
        "uniform": rng.uniform(-1, 1, (n, b, a)).astype(np.float32),
    }
    eps_next = noise["eps_next"] if sampled_backup else np.zeros((b, a), np.float32)
    queue = [noise["eps_pi"], eps_next, noise["eps_curr"], noise["eps_cnext"]]
    tanh_gaussian = o2o.tanh_gaussian

    class ReplayedTanhGaussian:
        """Our tanh-Gaussian whose samples take the next draw of `queue`."""

        def __init__(self, mean, log_std):
            self.mean, self.std, self.dist = mean, jnp.exp(log_std), tanh_gaussian(mean, log_std)

        def sample_and_log_prob(self, seed, sample_shape=()):
            pre_tanh = self.mean + self.std * jnp.asarray(queue.pop(0))
            base, bijector = self.dist.distribution, self.dist.bijector
            log_prob = base.log_prob(pre_tanh) - bijector.forward_log_det_jacobian(pre_tanh)
            return jnp.tanh(pre_tanh), log_prob

        def log_prob(self, value):
            return self.dist.log_prob(value)

    patched = {
        (o2o, "tanh_gaussian"): ReplayedTanhGaussian,
        (jax.random, "uniform"): lambda k, shape, minval=0.0, maxval=1.0: jnp.asarray(
            noise["uniform"]
        ),
        (jax.random, "randint"): lambda k, shape, low, high: jnp.arange(shape[0]),
    }
    saved = {target: getattr(*target) for target in patched}
    for (module, name), value in patched.items():
        setattr(module, name, value)
    try:
        update = o2o.make_cql_update(args, actor, critic, s["action_dim"])
        data = {k: jnp.asarray(v) for k, v in batch.items()}
        new, metrics = update(members, data, key, jnp.int32(args.bc_steps))
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)
    member = lambda t: jax.tree_util.tree_map(lambda x: np.asarray(x[0], np.float64), t)  # noqa: E731
    grads = torch_layout(
        jax.tree_util.tree_map(lambda old, new: old - new, member(members.actor.params),
                               member(new.actor.params)),
        jax.tree_util.tree_map(lambda old, new: old - new, member(members.critic.params),
                               member(new.critic.params)),
        member(members.critic_target),
    )  # fmt: skip
    grads = {f"grad.{k}": v for k, v in grads.items() if not k.startswith("q_target")}
    grads["grad.log_alpha"] = np.float64(LOG_ALPHA - float(new.log_alpha.params["v"][0]))
    ours = {k: float(np.asarray(v).mean()) for k, v in metrics.items()}
    ours["conservative_loss"] = args.cql_weight * 2 * ours["cql_gap"]  # summed over the twins
    inputs = {
        **torch_layout(member(members.actor.params), member(members.critic.params),
                       member(members.critic_target)),
        **batch, **noise, "log_alpha": np.float64(LOG_ALPHA),
        **{k: np.int64(v) for k, v in SIZES.items()},
    }  # fmt: skip
    return inputs, ours, grads


def relative_error(ours, peer) -> float:
    ours, peer = np.asarray(ours, np.float64), np.asarray(peer, np.float64)
    return float(np.abs(ours - peer).max() / max(np.abs(peer).max(), 1e-12))


def global_norm(tensors: dict, keys: list[str]) -> float:
    return float(np.sqrt(sum((np.asarray(tensors[k], np.float64) ** 2).sum() for k in keys)))


def compare(peer_python: pathlib.Path = PEER_PYTHON) -> tuple[list[dict], dict]:
    """Rows {quantity, ours, d3rlpy, error (relative)} and the extra measurements."""
    inputs, ours, grads = our_update()
    with tempfile.TemporaryDirectory() as tmp:
        in_path, out_path = pathlib.Path(tmp) / "in.npz", pathlib.Path(tmp) / "out.npz"
        np.savez(in_path, **inputs)
        proc = subprocess.run(
            [str(peer_python), "-m", "studies.cql_peer.same_batch", "--peer", str(in_path),
             str(out_path)],
            cwd=REPO, capture_output=True, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        if proc.returncode != 0:
            sys.exit(f"error: the d3rlpy half failed: {proc.stderr.strip().splitlines()[-1]}")
        peer = dict(np.load(out_path))
    rows = []
    for key in ("bellman_loss", "conservative_loss", "critic_loss", "actor_loss"):
        rows.append({"quantity": key, "ours": ours[key], "d3rlpy": float(peer[key]),
                     "error": relative_error(ours[key], peer[key])})  # fmt: skip
    for group in ("grad.q.", "grad.policy."):
        keys = sorted(k for k in peer if k.startswith(group))
        err = max(relative_error(grads[k], peer[k]) for k in keys)
        name = "critic gradient" if group == "grad.q." else "actor gradient"
        rows.append({"quantity": f"{name} (norm; error: max over tensors)",
                     "ours": global_norm(grads, keys), "d3rlpy": global_norm(peer, keys),
                     "error": err})  # fmt: skip
    # temperature: d3rlpy's loss is -alpha (log pi + |A|), ours -log(alpha) (log pi + |A|), so
    # d3rlpy's gradient on log(alpha) is alpha times ours (same sign)
    alpha = float(np.exp(LOG_ALPHA))
    rows.append({"quantity": "temperature gradient on log(alpha), ours x alpha",
                 "ours": float(grads["grad.log_alpha"]) * alpha,
                 "d3rlpy": float(peer["grad.log_alpha"]),
                 "error": relative_error(float(grads["grad.log_alpha"]) * alpha,
                                         peer["grad.log_alpha"])})  # fmt: skip
    _, sampled, _ = our_update(sampled_backup=True)
    extra = {"bellman_loss_sampled_backup": sampled["bellman_loss"],
             "bellman_loss_mean_backup": ours["bellman_loss"]}  # fmt: skip
    return rows, extra


def markdown(rows: list[dict], extra: dict) -> str:
    s = SIZES
    lines = [
        "# One CQL update, ours and d3rlpy's, on the same batch, parameters and noise",
        "",
        f"`python -m studies.cql_peer.same_batch` (d3rlpy 2.8.1): an N=1 CQL member at the "
        f"authors' settings (min_q_weight 5, {s['n_actions']} sampled actions, deterministic "
        f"backup), {s['hidden']}-{s['hidden']} networks, |S| = {s['obs_dim']}, |A| = "
        f"{s['action_dim']}, a batch of {s['batch']} with terminal transitions, alpha = 0.7, "
        f"target critics off the critics. Relative error: max |ours - d3rlpy| / max |d3rlpy|.",
        "",
        "| quantity | ours | d3rlpy | relative error |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['quantity']} | {r['ours']:.6g} | {r['d3rlpy']:.6g} | {r['error']:.1e} |"
              for r in rows]  # fmt: skip
    worst = max(r["error"] for r in rows)
    lines += [
        "",
        f"Largest relative error {worst:.1e} (float32 on both sides; tolerance {RTOL:g}).",
        "",
        "By design (not compared above): d3rlpy's deterministic backup evaluates the target "
        "critics at the policy's mean action at s', ours (as the CQL authors' code) at a sampled "
        "one; above, ours was given zero noise there. With a sampled next action our Bellman loss "
        f"on this batch is {extra['bellman_loss_sampled_backup']:.6g} instead of "
        f"{extra['bellman_loss_mean_backup']:.6g}. d3rlpy's temperature loss is -alpha (log pi + "
        "|A|) where ours is -log(alpha) (log pi + |A|): the same sign, so under Adam the same "
        "steps. d3rlpy steps the critic before the actor (its actor loss then sees the new "
        "critic); ours computes both from the pre-update networks, as the CQL authors' code.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", nargs=2, type=pathlib.Path, metavar=("IN", "OUT"),
                        help="the d3rlpy half (in .venv-peer): read IN, write OUT")  # fmt: skip
    parser.add_argument("--peer-python", type=pathlib.Path, default=PEER_PYTHON)
    args = parser.parse_args(argv)
    if args.peer:
        inputs = dict(np.load(args.peer[0]))
        np.savez(args.peer[1], **peer_losses(inputs))
        return 0
    if not args.peer_python.exists():
        parser.error(f"--peer-python {args.peer_python}: not found; create .venv-peer (README.md)")
    rows, extra = compare(args.peer_python)
    text = markdown(rows, extra)
    RESULTS.mkdir(exist_ok=True)
    tmp = RESULTS / "same_batch.md.tmp"
    tmp.write_text(text)
    tmp.replace(RESULTS / "same_batch.md")
    print(text)
    print(json.dumps({"worst_relative_error": max(r["error"] for r in rows)}))
    return 0 if all(r["error"] <= RTOL for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
