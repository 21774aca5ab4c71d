"""What balanced replay actually samples, and what the critics make of the online data.

Balanced replay (`algorithms/off2on_balanced.py`, CoRL 2021 Sec. 4.1) draws a transition with
probability proportional to its priority, w(s, a)^(1/T) normalised over an offline batch (Eq. 6,
the authors' code), where w estimates d_on / d_off (Eq. 4). Whether it differs from uniform
replay depends on two things this script reads from a run's resume checkpoint as it stands:

- the density-ratio net on every transition in the buffer, offline (the dataset) and online:
  means, quantiles, the share at exactly 0 (the ReLU output), and the AUROC of w as a classifier
  of online against offline samples (0.5: no discrimination). A calibrated estimate has
  E_off[w] = 1;
- the priorities stored in the sum-tree: the offline share of the total priority is the expected
  offline share of the next balanced batch; uniform replay's is M / (buffer size).

And for any replay scheme, the ensemble's Q (each member's twin minimum, averaged over members,
as the actor reads it) on the run's own online transitions against their Monte-Carlo discounted
returns (cut at the episode's end, so a time-limit-truncated episode's reads low near its end;
the unfinished last episode is left out), for the run's critics now and for the critics it
started from (the `--offline-checkpoint` ensemble or the run's own `offline.npz`): whether
fine-tuning made the critics over- or under-estimate the states and actions it actually visits.

    python -m studies.replay_probe.replay_probe RUN_DIR [--out DIR]

RUN_DIR is an off2on_balanced.py run with a `checkpoint.npz` from its online phase. Prints
Markdown tables; `--out DIR` also writes `replay_probe.{md,json}` there.
"""

import argparse
import json
import pathlib
import sys

import numpy as np

from benchmarks.export_pretrained import params_under
from common.checkpoints import atomic_write_text
from studies.q_calibration.q_calibration import discounted_returns_to_go, episode_bounds

GAMMA = 0.99

DR_PREFIX = ".density_ratio.params"
DATA_KEY = ".buffer.storage.data['{}']"
TRANSITION_FIELDS = ("observations", "actions", "rewards", "terminals", "timeouts")


class ProbeError(ValueError):
    """A user-facing problem with the run to probe; one line saying how to fix it."""


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative) + P(tie) / 2, by midranks (Mann-Whitney U)."""
    scores = np.concatenate([positive, negative])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # midranks: tied scores share the mean of their 1-based positions
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def summarize(w_offline, w_online, priority_offline, priority_online) -> dict:
    """The density ratio and priorities of the offline and online parts of a buffer."""

    def part(w, p):
        return {
            "n": int(w.size),
            "w_mean": float(w.mean()),
            "w_median": float(np.median(w)),
            "w_q05": float(np.quantile(w, 0.05)),
            "w_q95": float(np.quantile(w, 0.95)),
            "w_zero_share": float((w == 0).mean()),
            "priority_mean": float(p.mean()),
            "priority_sum": float(p.sum()),
        }

    total = float(priority_offline.sum() + priority_online.sum())
    return {
        "offline": part(w_offline, priority_offline),
        "online": part(w_online, priority_online),
        "auroc_online_vs_offline": auroc(w_online, w_offline),
        "balanced_offline_share": float(priority_offline.sum()) / total,
        "uniform_offline_share": w_offline.size / (w_offline.size + w_online.size),
    }


def complete_episode_ids(terminals, timeouts) -> np.ndarray:
    """An episode id per transition from the end marks (a termination or a time-limit cut); the
    transitions after the last mark (an unfinished episode) get -1."""
    ends = (np.asarray(terminals) > 0) | (np.asarray(timeouts) > 0)
    ids = np.concatenate([[0], np.cumsum(ends)[:-1]])
    ids[ids == ends.sum()] = -1
    return ids


def q_against_returns(q_now, q_start, rewards, episode_ids, gamma: float = GAMMA) -> dict:
    """Mean Q, Monte-Carlo return and their gap over the complete episodes' transitions, all of
    them and the first 100 steps of each episode."""
    done = episode_ids >= 0
    returns = discounted_returns_to_go(rewards[done], episode_ids[done], gamma)
    ids = episode_ids[done]
    starts, lengths = episode_bounds(ids)
    step_in_episode = np.arange(len(ids)) - np.repeat(starts, lengths)
    rows = {}
    for name, keep in (
        ("all", np.ones(len(ids), bool)),
        ("first 100 steps", step_in_episode < 100),
    ):
        row = {"n": int(keep.sum()), "mc_return": float(returns[keep].mean())}
        for label, q in (("now", q_now), ("start", q_start)):
            if q is not None:
                row[f"q_{label}"] = float(q[done][keep].mean())
                row[f"q_minus_mc_{label}"] = float((q[done][keep] - returns[keep]).mean())
        rows[name] = row
    return {"episodes": int(ids.max() + 1) if len(ids) else 0, "rows": rows}


def start_critics(run_dir: pathlib.Path, args: dict):
    """The critics fine-tuning started from (the run's own offline.npz, else its
    `--offline-checkpoint`: an exported ensemble or another run's offline.npz), or None where
    that file is gone."""
    own = run_dir / "offline.npz"
    source = own if own.is_file() else pathlib.Path(args.get("offline_checkpoint") or "")
    if not source.is_file():
        return None
    with np.load(source, allow_pickle=False) as z:
        for prefix in ("[0].critic.params", "['critic']"):  # an offline phase's, an export's
            if any(key.startswith(prefix) for key in z.files):
                return params_under(z, prefix)
    return None


def probe(run_dir: pathlib.Path) -> dict:
    import jax

    from algorithms.off2on_balanced import Critic, twin_q
    from studies.off2on_dr_output.dr_output import density_ratio_class

    ckpt, config = run_dir / "checkpoint.npz", run_dir / "config.json"
    if not ckpt.is_file() or not config.is_file():
        raise ProbeError(
            f"{run_dir}: no checkpoint.npz and config.json (an off2on_balanced run dir?)"
        )
    args = json.loads(config.read_text())
    hidden = tuple(args["hidden_dims"])
    with np.load(ckpt, allow_pickle=False) as z:
        dr_params = params_under(z, DR_PREFIX)
        if not dr_params:
            raise ProbeError(
                f"{ckpt}: no online state yet (still pretraining?); "
                "probe it once fine-tuning has run"
            )
        critics_now = params_under(z, ".critic.params")
        size, env_steps = int(z[".buffer.storage.size"]), int(z[".env_steps"])
        data = {k: z[DATA_KEY.format(k)][:size] for k in TRANSITION_FIELDS}
        tree = z[".buffer.tree"]
    num_offline = size - min(env_steps, args["online_buffer_size"])
    result = {"run_dir": str(run_dir), "env": args["env"], "replay": args["replay"]}
    result["online_steps"] = env_steps

    def batched(fn):  # fn(obs, actions) over the buffer rows [lo, hi) in chunks
        fn = jax.jit(fn)
        return lambda lo, hi: np.concatenate(
            [
                np.asarray(fn(data["observations"][i : min(i + 65536, hi)],
                              data["actions"][i : min(i + 65536, hi)]))
                for i in range(lo, hi, 65536)
            ]
        )  # fmt: skip

    if args["replay"] == "balanced":  # the other schemes never train the density-ratio net
        # the run's own output layer (studies/off2on_dr_output --dr-output; else the ReLU)
        net = density_ratio_class(args.get("dr_output", "relu"))(hidden_dims=hidden)
        w = batched(lambda o, a: net.apply(dr_params, o, a))(0, size)
        priorities = tree[tree.shape[0] // 2 :][:size]  # the sum-tree's leaves
        result |= summarize(
            w[:num_offline], w[num_offline:], priorities[:num_offline], priorities[num_offline:]
        )
    if env_steps <= args["online_buffer_size"]:  # the online ring has not wrapped: in order
        critic = Critic(hidden)

        def ensemble_q(params):  # each member's twin minimum, averaged over members
            return batched(
                lambda o, a: (
                    jax.vmap(twin_q, in_axes=(None, 0, None, None))(critic, params, o, a)
                    .min(1)
                    .mean(0)
                )
            )(num_offline, size)

        start = start_critics(run_dir, args)
        online = slice(num_offline, size)
        result["q_online"] = q_against_returns(
            ensemble_q(critics_now),
            None if start is None else ensemble_q(start),
            data["rewards"][online],
            complete_episode_ids(data["terminals"][online], data["timeouts"][online]),
            args["gamma"],
        )
    return result


def markdown(result: dict) -> str:
    rows = [
        f"# Replay probe: {result['run_dir']}",
        "",
        f"{result['env']}, `--replay {result['replay']}`, after {result['online_steps']} online "
        "steps.",
    ]
    if "offline" in result:
        rows += [
            "",
            "## Density ratio and priorities",
            "",
            "w: the density-ratio net (Eq. 4); priority: the sum-tree leaf (Eq. 6).",
            "",
            "| part | n | E[w] | median w | 5%-95% of w | w = 0 | mean priority | priority mass |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name in ("offline", "online"):
            p = result[name]
            rows.append(
                f"| {name} | {p['n']} | {p['w_mean']:.3f} | {p['w_median']:.3f} "
                f"| {p['w_q05']:.3f}-{p['w_q95']:.3f} "
                f"| {100 * p['w_zero_share']:.1f}% | {p['priority_mean']:.3f} "
                f"| {p['priority_sum']:.0f} |"
            )
        rows += [
            "",
            f"AUROC of w, online against offline: {result['auroc_online_vs_offline']:.3f} "
            "(0.5: no discrimination). Offline share of the next balanced batch: "
            f"{result['balanced_offline_share']:.4f}; of a uniform one: "
            f"{result['uniform_offline_share']:.4f}.",
        ]
    if "q_online" in result:
        q = result["q_online"]
        rows += [
            "",
            "## The ensemble's Q on the run's own online transitions",
            "",
            f"{q['episodes']} complete episodes; MC: the discounted return to the episode's end.",
            "",
            "| transitions | n | MC return | Q now | Q − MC now | Q at the start "
            "| Q − MC at the start |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in q["rows"].items():
            start = (
                f"{r['q_start']:.1f} | {r['q_minus_mc_start']:+.1f}" if "q_start" in r else "— | —"
            )
            rows.append(
                f"| {name} | {r['n']} | {r['mc_return']:.1f} | {r['q_now']:.1f} "
                f"| {r['q_minus_mc_now']:+.1f} | {start} |"
            )
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m studies.replay_probe.replay_probe", description=__doc__.splitlines()[0]
    )
    parser.add_argument("run_dir", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, help="write replay_probe.{md,json} here")
    args = parser.parse_args(argv)
    try:
        result = probe(args.run_dir)
    except ProbeError as e:
        parser.error(str(e))
    text = markdown(result)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "replay_probe.json", json.dumps(result, indent=2) + "\n")
        atomic_write_text(args.out / "replay_probe.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
