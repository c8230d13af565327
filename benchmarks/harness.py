"""What every benchmark shares: the machine/commit/date stamp, the table, the JSON rows."""

import datetime
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from colld_ds.atomic import write_text_atomic


def machine_info(device: torch.device) -> dict:
    """Machine, torch version, commit and UTC date, stamped on every row."""
    commit = os.environ.get("COLLD_COMMIT")    # named in the call: the GPU machine's copy may
    if not commit:                              # hold a stale .git of another commit
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                check=True, cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return {
        "machine": machine,
        "torch": torch.__version__,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def peak_bytes(fn, device: torch.device) -> int:
    """Peak allocator bytes above the starting point while ``fn`` runs.

    CUDA: ``max_memory_allocated`` after a reset. CPU: the profiler's ``[memory]`` events, whose
    ``Total Allocated`` counts from the profiler start (tensors that existed before are
    excluded); it follows the ops' allocations and frees, so it is deterministic.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")


def print_table(rows: list[dict], cols: list[str]) -> None:
    print(" | ".join(f"{c:>13}" for c in cols))
    for row in rows:
        cells = [row.get(c, row.get("error", "")) for c in cols]
        print(" | ".join(f"{v:>13.2f}" if isinstance(v, float) else f"{v!s:>13}" for v in cells))


def write_rows(rows: list[dict], out: str | Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(rows, indent=1) + "\n")     # a killed run leaves no half file
    print(f"wrote {len(rows)} rows to {out}")
