"""`python -m common.dataset_cli list | info NAME | verify NAME`: the datasets' command line."""

import sys

from common.d4rl import DatasetError
from common.dataset_checks import verify_dataset
from common.datasets import known_names, load_d4rl, minari_root, parse_name, resolve
from common.flags import ArgumentParser


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m common.dataset_cli", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the known D4RL names and where each resolves")
    info = sub.add_parser("info", help="load a dataset by name and describe it")
    info.add_argument("name")
    info.add_argument("--no-download", action="store_true", help="never contact the Minari hub")
    info.add_argument("--no-generate", action="store_true", help="never generate a missing one")
    check = sub.add_parser("verify", help="check a dataset's integrity; exit 1 if damaged")
    check.add_argument(
        "name", help="D4RL name (hopper-medium-v2) or Minari id (o2o/hopper/medium-v0)"
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            for name in known_names():
                try:
                    dataset_id, source = resolve(name, allow_download=False)
                    print(f"{name:32s} {dataset_id} [{source}]")
                except DatasetError:
                    print(f"{name:32s} (missing)")
        elif args.command == "info":
            load_d4rl(
                args.name,
                allow_download=not args.no_download,
                allow_generate=not args.no_generate,
            )
        elif args.command == "verify":
            if "/" in args.name:
                dataset_id, env = args.name, args.name.split("/")[1]
            else:
                env = parse_name(args.name)[0]
                dataset_id = resolve(args.name, allow_download=False)[0]
            problems, stats = verify_dataset(minari_root() / dataset_id, env)
            print(f"{dataset_id}: " + ", ".join(f"{k}={v:.6g}" for k, v in stats.items()))
            for problem in problems[:20]:
                print(f"FAIL {problem}", file=sys.stderr)
            if problems:
                print(f"error: {dataset_id} is damaged ({len(problems)} problems)", file=sys.stderr)
                return 1
            print(f"OK {dataset_id}")
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
