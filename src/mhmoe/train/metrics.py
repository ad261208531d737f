"""What a run reports while it trains: metrics.jsonl (every record), metrics.csv (fixed columns), TensorBoard
(when installed), and a progress bar."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from mhmoe.io import write_text

CSV_COLUMNS = ["step", "tokens", "loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_ppl"]


class MetricsLog:
    """metrics.jsonl (every record), metrics.csv (fixed columns), TensorBoard when installed."""

    def __init__(self, run_dir: Path, resume_step: int):
        self.jsonl, self.csv = run_dir / "metrics.jsonl", run_dir / "metrics.csv"
        self._truncate_after(resume_step)
        new_csv = not self.csv.exists()
        self._csv_file = open(self.csv, "a", newline="")
        self._csv = csv.DictWriter(self._csv_file, CSV_COLUMNS, extrasaction="ignore")
        if new_csv:
            self._csv.writeheader()
        self._jsonl_file = open(self.jsonl, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb: Any = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:
            self._tb = None

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records a crashed run wrote after its last checkpoint."""
        for path in (self.jsonl, self.csv):
            if not path.exists():
                continue
            lines = path.read_text().splitlines(keepends=True)
            if path.suffix == ".jsonl":
                kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
            else:
                kept = lines[:1] + [line for line in lines[1:] if int(line.split(",", 1)[0]) <= step]
            write_text(path, "".join(kept))

    def write(self, record: dict) -> None:
        self._jsonl_file.write(json.dumps(record) + "\n")
        self._jsonl_file.flush()
        self._csv.writerow(record)
        self._csv_file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._csv_file.close()
        self._jsonl_file.close()
        if self._tb is not None:
            self._tb.close()


class NoMetrics:
    """Ranks other than 0 log nothing."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int, enabled: bool, unit: str = "step", desc: str | None = None) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, disable=not enabled, unit=unit, desc=desc, dynamic_ncols=True, file=sys.stderr
    )
