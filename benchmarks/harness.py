"""What every benchmark shares: the machine/commit/date stamp, the table, the JSON rows."""

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch


def machine_info(device: torch.device) -> dict:
    """Machine, torch version, commit and UTC date, stamped on every row."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
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


def print_table(rows: list[dict], cols: list[str]) -> None:
    print(" | ".join(f"{c:>13}" for c in cols))
    for row in rows:
        cells = [row.get(c, row.get("error", "")) for c in cols]
        print(" | ".join(f"{v:>13.2f}" if isinstance(v, float) else f"{v!s:>13}" for v in cells))


def write_rows(rows: list[dict], out: str | Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {len(rows)} rows to {out}")
