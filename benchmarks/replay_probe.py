"""What balanced replay actually samples: the density ratio and the priorities of a run's buffer.

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

    python -m benchmarks.replay_probe RUN_DIR [--out DIR]

RUN_DIR is a `--replay balanced` run of off2on_balanced.py with a `checkpoint.npz`. Prints a
Markdown table; `--out DIR` also writes `replay_probe.{md,json}` there.
"""

import argparse
import json
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "algorithms"))
from common.checkpoints import atomic_write_text  # noqa: E402

DR_KEY = ".density_ratio.params['params']['Dense_{}']['{}']"
DATA_KEY = ".buffer.storage.data['{}']"


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


def probe(run_dir: pathlib.Path) -> dict:
    import jax
    from off2on_balanced import DensityRatio

    ckpt, config = run_dir / "checkpoint.npz", run_dir / "config.json"
    if not ckpt.is_file() or not config.is_file():
        raise ProbeError(
            f"{run_dir}: no checkpoint.npz and config.json (an off2on_balanced run dir?)"
        )
    args = json.loads(config.read_text())
    if args.get("replay") != "balanced":
        raise ProbeError(f"{run_dir}: --replay {args.get('replay')}; probe a --replay balanced run")
    with np.load(ckpt, allow_pickle=False) as z:
        if DR_KEY.format(0, "kernel") not in z.files:
            raise ProbeError(
                f"{ckpt}: no online state yet (still pretraining?); "
                "probe it once fine-tuning has run"
            )
        layers = len(args["hidden_dims"]) + 1
        params = {
            "params": {
                f"Dense_{i}": {n: z[DR_KEY.format(i, n)] for n in ("bias", "kernel")}
                for i in range(layers)
            }
        }
        size, env_steps = int(z[".buffer.storage.size"]), int(z[".env_steps"])
        obs = z[DATA_KEY.format("observations")][:size]
        actions = z[DATA_KEY.format("actions")][:size]
        tree = z[".buffer.tree"]
    num_offline = size - min(env_steps, args["online_buffer_size"])
    priorities = tree[tree.shape[0] // 2 :][:size]  # the sum-tree's leaves
    net = DensityRatio(hidden_dims=tuple(args["hidden_dims"]))
    apply = jax.jit(lambda o, a: net.apply(params, o, a))
    w = np.concatenate(
        [
            np.asarray(apply(obs[i : i + 65536], actions[i : i + 65536]))
            for i in range(0, size, 65536)
        ]
    )
    summary = summarize(
        w[:num_offline], w[num_offline:], priorities[:num_offline], priorities[num_offline:]
    )
    return {"run_dir": str(run_dir), "env": args["env"], "online_steps": env_steps, **summary}


def markdown(result: dict) -> str:
    rows = [
        f"# Balanced replay probe: {result['run_dir']}",
        "",
        f"{result['env']}, after {result['online_steps']} online steps. "
        "w: the density-ratio net (Eq. 4); "
        "priority: the sum-tree leaf (Eq. 6).",
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
        "(0.5: no discrimination). "
        "Offline share of the next balanced batch: "
        f"{result['balanced_offline_share']:.4f}; of a uniform one: "
        f"{result['uniform_offline_share']:.4f}.",
    ]
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.replay_probe", description=__doc__.splitlines()[0]
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
