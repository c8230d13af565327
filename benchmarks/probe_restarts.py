"""Does the CTC probe give the same error rate whatever its seed? The teacher's probe PER/CER
over several probe seeds, without restarts and with ``ProbeConfig.restarts``.

    python benchmarks/probe_restarts.py --config configs/whisper-base_to_2l_colld.yaml \\
        --probe_train_shards 'corpus/train-*.tar' --probe_dev_shards 'corpus/dev-*.tar' \\
        --eval_shards 'corpus/test-*.tar' --out benchmarks/results/probe_restarts_whisper_demo \\
        [--section.field value ...]

Writes ``<out>.json`` and ``<out>.md``: per setting and seed the test PER/CER (state chosen on
the dev split), the probe's final training loss and each restart's early loss. ``<out>.json`` is
written after every row; a re-run with the same probe steps only probes the rows it lacks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script, like the others
from benchmarks.harness import machine_info  # noqa: E402
from benchmarks.quality import parse_overrides, read_splits  # noqa: E402
from colld_ds.atomic import write_text_atomic  # noqa: E402
from colld_ds.compare import make_paths_absolute  # noqa: E402
from colld_ds.config import load_config  # noqa: E402
from colld_ds.distill import build_run  # noqa: E402
from colld_ds.evaluate import with_layers, teacher_encoder  # noqa: E402
from colld_ds.probe import TASKS, ProbeConfig, extract_splits, score_model  # noqa: E402


def previous_rows(path: Path, probe_steps: int) -> list[dict]:
    """The rows of an earlier run of this script at ``path`` made with the same probe steps."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return found["rows"] if found.get("probe_steps") == probe_steps else []


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--probe_train_shards", required=True)
    parser.add_argument("--probe_dev_shards", required=True)
    parser.add_argument("--eval_shards", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--restarts", default="1,4", help="restart counts to compare")
    parser.add_argument("--probe_steps", type=int, default=ProbeConfig.steps)
    parser.add_argument("--out", required=True, help="path prefix of the .json and .md")
    args, rest = parser.parse_known_args(argv)
    torch.set_num_threads(1)
    config = load_config(args.config, parse_overrides(rest))
    make_paths_absolute(config)
    train, dev, test, tasks = read_splits(args.probe_train_shards, args.probe_dev_shards,
                                          args.eval_shards)
    report = {"command": " ".join(sys.argv), "config": args.config, "overrides": rest,
              "probe_steps": args.probe_steps, "stamp": machine_info(torch.device("cpu")),
              "rows": previous_rows(Path(f"{args.out}.json"), args.probe_steps)}
    done = {(row["restarts"], row["seed"]) for row in report["rows"]}
    wanted = [(int(restarts), int(seed)) for restarts in args.restarts.split(",")
              for seed in args.seeds.split(",")]
    splits = None
    for restarts, seed in (key for key in wanted if key not in done):
        if splits is None:                       # the teacher runs only if a row is missing
            teacher, _, _ = build_run(config, torch.device("cpu"))
            splits = extract_splits(teacher_encoder(with_layers(teacher)), train, test,
                                    dev)
        probe = ProbeConfig(steps=args.probe_steps, seed=seed, restarts=restarts,
                            select_every=100)
        result = score_model(splits, tasks, test, probe, dev)
        report["rows"].append({"restarts": restarts, "seed": seed,
                               **{task: result["rates"][task]["overall"] for task in TASKS},
                               "final_train_loss": result["final_train_loss"],
                               "restart_losses": result["restart_losses"]})
        print(json.dumps(report["rows"][-1]), flush=True)
        write_text_atomic(Path(f"{args.out}.json"), json.dumps(report, indent=1))
    report["rows"] = rows = sorted(
        (row for row in report["rows"] if (row["restarts"], row["seed"]) in wanted),
        key=lambda row: (row["restarts"], row["seed"]))
    write_text_atomic(Path(f"{args.out}.json"), json.dumps(report, indent=1))
    lines = ["# CTC probe of the teacher over probe seeds, without and with restarts", "",
             f"`{report['command']}`; {report['stamp']['machine']}, commit "
             f"{report['stamp']['commit']}. Test error rates (state chosen on the dev split); "
             "final training loss = mean over the last 10 % of steps (a stalled probe stays "
             "near 4-5); restart losses = each restart's mean loss over the second half of its "
             "early steps (the lowest goes on).", "",
             "| restarts | seed | PER | CER | final loss PER / CER | restart losses PER |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['restarts']} | {r['seed']} | {r['per']:.3f} | {r['cer']:.3f} | "
              f"{r['final_train_loss']['per']:.2f} / {r['final_train_loss']['cer']:.2f} | "
              + (" ".join(f"{x:.2f}" for x in r["restart_losses"]["per"]) or "-") + " |"
              for r in rows]
    write_text_atomic(Path(f"{args.out}.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
