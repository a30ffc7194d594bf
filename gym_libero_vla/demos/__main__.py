"""Command line: ``python -m gym_libero_vla.demos generate ...`` or ``... replay --file FILE``.

Examples::

    python -m gym_libero_vla.demos generate --suite spatial --episodes-per-task 20 --out data/spatial.hdf5
    python -m gym_libero_vla.demos generate --suite object --obs-mode rgb+state --image-size 128 --task-ids 0 1
    python -m gym_libero_vla.demos replay --file data/spatial.hdf5
"""

from __future__ import annotations

import json

import tyro

from gym_libero_vla.demos.generate import GenerateArgs, ReplayArgs, generate, replay_file


def main() -> None:
    args = tyro.extras.subcommand_cli_from_dict({"generate": GenerateArgs, "replay": ReplayArgs})
    if isinstance(args, GenerateArgs):
        counts = generate(args)
        print(json.dumps({"out": args.out, **counts}))
    else:
        results = replay_file(args)
        summary = {
            "file": args.file,
            "replayed": len(results),
            "successes": sum(r["success"] for r in results),
            "exact_replays": sum(r["max_state_drift"] == 0.0 for r in results),
            "max_state_drift": max((r["max_state_drift"] for r in results), default=0.0),
        }
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
