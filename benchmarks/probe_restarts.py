"""Does the CTC probe give the same error rate whatever its seed? The teacher's probe PER/CER
over several probe seeds, without restarts and with ``ProbeConfig.restarts``.

    python benchmarks/probe_restarts.py --config configs/whisper-base_to_2l_colld.yaml \\
        --probe_train_shards 'corpus/train-*.tar' --probe_dev_shards 'corpus/dev-*.tar' \\
        --eval_shards 'corpus/test-*.tar' --out benchmarks/results/probe_restarts_whisper_demo \\
        [--section.field value ...]

Writes ``<out>.json`` and ``<out>.md``: per setting and seed the test PER/CER (state chosen on
the dev split), the probe's final training loss and each restart's early loss.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script, like the others
from benchmarks.harness import machine_info  # noqa: E402
from benchmarks.quality import parse_overrides  # noqa: E402
from colld_ds.atomic import write_text_atomic  # noqa: E402
from colld_ds.compare import make_paths_absolute  # noqa: E402
from colld_ds.config import load_config  # noqa: E402
from colld_ds.distill import build_run  # noqa: E402
from colld_ds.evaluate import all_layers_teacher, teacher_encoder  # noqa: E402
from colld_ds.probe import (TASKS, ProbeConfig, ProbeTasks, extract_splits,  # noqa: E402
                            read_probe_split, score_model)


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
    train, dev, test = (read_probe_split(shards) for shards in
                        (args.probe_train_shards, args.probe_dev_shards, args.eval_shards))
    tasks = ProbeTasks.from_split(train)
    teacher, _, _ = build_run(config, torch.device("cpu"))
    splits = extract_splits(teacher_encoder(all_layers_teacher(teacher)), train, test, dev)
    rows = []
    for restarts in (int(r) for r in args.restarts.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            probe = ProbeConfig(steps=args.probe_steps, seed=seed, restarts=restarts,
                                select_every=100)
            result = score_model(splits, tasks, test, probe, dev)
            rows.append({"restarts": restarts, "seed": seed,
                         **{task: result["rates"][task]["overall"] for task in TASKS},
                         "final_train_loss": result["final_train_loss"],
                         "restart_losses": result["restart_losses"]})
            print(json.dumps(rows[-1]), flush=True)
    report = {"command": " ".join(sys.argv), "config": args.config, "overrides": rest,
              "probe_steps": args.probe_steps, "stamp": machine_info(torch.device("cpu")),
              "rows": rows}
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
