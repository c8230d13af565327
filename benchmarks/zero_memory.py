"""Bytes each rank holds under ZeRO stages 0/1/2/3: parameters, gradients, optimizer state, RSS.

For each stage, 2 fresh CPU ranks (``torch.multiprocessing`` spawn, gloo, ``DS_ACCELERATOR=cpu``)
build the real run (``colld_ds.distill.build_run``) on a tiny random XLS-R-style teacher
(``--teacher_width``, ``--teacher_layers``; student ``--student_layers`` at the teacher's width,
CoLLD objective, online teacher), ``deepspeed.initialize`` it with ``build_ds_config`` (the
``ds_configs/zero{stage}.json`` templates, fp32, AdamW) and take ``--steps`` training steps on
random audio. Fresh processes per stage, so each peak RSS belongs to one stage.

What is counted, per rank (tensors deduplicated by storage; a tensor that is a view into a flat
buffer counts the whole buffer once, padding included, since that is what is held):

* params: the model's parameter storages after the last step (ZeRO-1/2: the flat fp32 buffer the
  parameters are views of; ZeRO-3: each ``p.ds_tensor`` partition plus any parameter still held
  whole, i.e. the ones under ``stage3_param_persistence_threshold``).
* grads: measured after ``engine.backward`` and before ``engine.step`` of the last step, when
  gradients are alive: every ``p.grad`` plus the ZeRO gradient buffers (ZeRO-1/2
  ``averaged_gradients``, ``grads_in_partition``, ``ipg_buffer``; ZeRO-3
  ``grad_partitions_flat_buffer`` and its reduce bucket). Approximate: a buffer allocated with
  ``torch.empty`` (the ZeRO-2 reduce bucket, sized by ``reduce_bucket_size``) counts at full size
  although untouched pages never reach RSS; transient communication buffers are not seen. A
  gradient partition that is a view of a larger tensor (a parameter straddling the partition
  boundary) counts that tensor whole, so ZeRO-1/2 read a little over 1/N (0.55 at 2 ranks on
  the default model). ``grad_parts_MiB`` in the JSON says which buffer held them.
* optim: the base optimizer's state tensors (AdamW ``exp_avg``, ``exp_avg_sq``, ``step``) plus
  the fp32 master partitions (ZeRO-1/2 ``single_partition_of_fp32_groups``, ZeRO-3
  ``fp32_partitioned_groups_flat``). In fp32 training ZeRO-1/2/3 keep that master copy in
  addition to the model's parameters; stage 0 has none.
* peak RSS: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end; it includes the Python,
  torch and DeepSpeed runtime and the (frozen, unpartitioned) teacher, the same in every stage.

    python benchmarks/zero_memory.py            # teacher 256 wide x 4 layers, student 2 layers
"""

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")    # before deepspeed is imported, here and in ranks

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import machine_info, print_table, write_rows  # noqa: E402
from colld_ds.config import load_config  # noqa: E402
from colld_ds.data import Batch  # noqa: E402
from colld_ds.distill import build_run, distillation_loss, mask_batch, step_seed  # noqa: E402
from colld_ds.ds_config import build_ds_config  # noqa: E402
from colld_ds.ds_ops import prepare_op_builds  # noqa: E402
from colld_ds.formats import SAMPLE_RATE  # noqa: E402
from colld_ds.data_prep.tiny_teacher import make_tiny_teacher  # noqa: E402

MIB = 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tensors(obj):
    """Tensors in obj: a tensor, or (nested) lists/tuples/dicts of them."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


class StorageCounter:
    """Bytes of distinct storages; a storage already counted (in any category) counts 0."""

    def __init__(self):
        self.seen: set[int] = set()

    def count(self, tensors) -> int:
        total = 0
        for t in tensors:
            if t is None or t.numel() == 0:
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.seen:
                continue
            self.seen.add(key)
            total += storage.nbytes()
        return total


def _grad_tensors(engine, stage: int):
    params = list(engine.module.parameters())
    yield from (p.grad for p in params)
    opt = engine.optimizer
    if stage in (1, 2):
        yield from _tensors(getattr(opt, "averaged_gradients", None) or {})
        yield from _tensors(getattr(opt, "grads_in_partition", None))
        yield from _tensors(getattr(opt, "ipg_buffer", None))
    elif stage == 3:
        yield from _tensors(getattr(opt, "grad_partitions_flat_buffer", None))
        yield from _tensors(getattr(opt, "_DeepSpeedZeroOptimizer_Stage3__ipg_bucket_flat_buffer",
                                    None))


def _grad_parts(engine, stage: int) -> dict[str, float]:
    """Where the gradient bytes are (MiB per source, each source counted on its own)."""
    opt = engine.optimizer
    sources = {"p.grad": [p.grad for p in engine.module.parameters()]}
    names = {1: ["averaged_gradients", "grads_in_partition", "ipg_buffer"],
             2: ["averaged_gradients", "grads_in_partition", "ipg_buffer"],
             3: ["grad_partitions_flat_buffer",
                 "_DeepSpeedZeroOptimizer_Stage3__ipg_bucket_flat_buffer"]}.get(stage, [])
    for name in names:
        sources[name.split("__")[-1]] = list(_tensors(getattr(opt, name, None)))
    return {name: StorageCounter().count(ts) / MIB for name, ts in sources.items()}


def _param_tensors(engine, stage: int):
    for p in engine.module.parameters():
        if stage == 3 and hasattr(p, "ds_tensor"):
            yield p.ds_tensor
        yield p.data          # ZeRO-3: empty once partitioned, unless persistent


def _optim_tensors(engine, stage: int):
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt) if stage > 0 else opt
    for state in base.state.values():
        yield from _tensors(state)
    if stage in (1, 2):
        yield from _tensors(getattr(opt, "single_partition_of_fp32_groups", []))
    elif stage == 3:
        yield from _tensors(getattr(opt, "fp32_partitioned_groups_flat", []))


def rank_main(rank: int, world_size: int, port: int, stage: int, args, teacher_dir: str,
              out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    prepare_op_builds()
    deepspeed.init_distributed(dist_backend="gloo")
    config = load_config(None, {
        "teacher.path": teacher_dir, "data.train_shards": "unused",
        "student.num_layers": args.student_layers, "data.batch_size": args.batch_size,
        "data.max_seconds": args.seconds, "objective.num_negatives": 20,
        "masking.span_length": 5, "optim.warmup_steps": 1, "optim.max_steps": args.steps,
        "run.zero_stage": stage, "run.precision": "fp32", "run.out_dir": out_dir,
    })
    device = torch.device("cpu")
    teacher, _, model = build_run(config, device)
    teacher_layers = list(teacher.layers)
    model_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=build_ds_config(config))

    samples = int(args.seconds * SAMPLE_RATE)
    generator = torch.Generator().manual_seed(rank)
    counter = StorageCounter()
    grad_bytes = 0
    started = time.perf_counter()
    for step in range(args.steps):
        batch = Batch(wave=torch.randn(args.batch_size, samples, generator=generator) * 0.1,
                      wave_lengths=torch.full((args.batch_size,), samples, dtype=torch.long),
                      keys=[f"u{i}" for i in range(args.batch_size)],
                      langs=["xx"] * args.batch_size)
        torch.manual_seed(step_seed(config, rank, step))
        masked = mask_batch(batch, teacher, config, step, engine.module.objective)
        output = distillation_loss(engine, teacher, masked, config, teacher_layers)
        engine.backward(output.loss)
        if step == args.steps - 1:      # gradients alive: between backward and step
            grad_bytes = StorageCounter().count(_grad_tensors(engine, stage))
            grad_parts = _grad_parts(engine, stage)
        engine.step()
    step_s = (time.perf_counter() - started) / args.steps
    param_bytes = counter.count(_param_tensors(engine, stage))
    optim_bytes = counter.count(_optim_tensors(engine, stage))
    row = dict(stage=stage, rank=rank, model_params=model_params,
               param_MiB=param_bytes / MIB, grad_MiB=grad_bytes / MIB,
               optim_MiB=optim_bytes / MIB, grad_parts_MiB=grad_parts,
               peak_rss_MiB=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               step_s=step_s, loss=float(output.loss.detach()))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(row))
    dist.barrier()
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--teacher_width", type=int, default=256)
    parser.add_argument("--teacher_layers", type=int, default=4)
    parser.add_argument("--student_layers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/zero_memory_cpu.json")
    args = parser.parse_args()
    info = machine_info(torch.device("cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir = make_tiny_teacher("xlsr", str(Path(tmp) / "teacher"), seed=0,
                                        num_layers=args.teacher_layers,
                                        hidden_size=args.teacher_width)
        for stage in args.stages:
            out_dir = Path(tmp) / f"zero{stage}"
            out_dir.mkdir()
            started = time.perf_counter()
            mp.spawn(rank_main, args=(args.ranks, _free_port(), stage, args, teacher_dir,
                                      str(out_dir)), nprocs=args.ranks, join=True)
            print(f"[zero_memory] stage {stage}: {time.perf_counter() - started:.0f} s",
                  flush=True)
            for rank in range(args.ranks):
                row = json.loads((out_dir / f"rank{rank}.json").read_text())
                rows.append(dict(row, ranks=args.ranks, precision="fp32",
                                 teacher=f"{args.teacher_layers} x {args.teacher_width}",
                                 student_layers=args.student_layers, **info))
    base = {r["rank"]: r for r in rows if r["stage"] == 0}
    for row in rows:
        ref = base.get(row["rank"])
        for key in ("param", "grad", "optim", "peak_rss"):
            value = row[f"{key}_MiB"]
            row[f"{key}_ratio"] = (value / ref[f"{key}_MiB"]
                                   if ref and ref[f"{key}_MiB"] else float("nan"))
        row["state_MiB"] = row["param_MiB"] + row["grad_MiB"] + row["optim_MiB"]
        row["state_ratio"] = row["state_MiB"] / (ref["param_MiB"] + ref["grad_MiB"]
                                                 + ref["optim_MiB"]) if ref else float("nan")
    print_table(rows, ["stage", "rank", "param_MiB", "grad_MiB", "optim_MiB", "state_MiB",
                       "peak_rss_MiB", "param_ratio", "grad_ratio", "optim_ratio",
                       "state_ratio", "peak_rss_ratio"])
    write_rows(rows, args.out)


if __name__ == "__main__":
    main()
