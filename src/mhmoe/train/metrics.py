"""What a run reports while it trains: metrics.jsonl (every record), metrics.csv (fixed columns), TensorBoard
(when installed), and a progress bar."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from mhmoe.io import notice, write_text

CSV_COLUMNS = ["step", "tokens", "loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_ppl"]


CSV_HEADER = ",".join(CSV_COLUMNS) + "\r\n"  # as csv.DictWriter writes it


def _record_step(line: str, suffix: str) -> int | None:
    """The step of one finished metrics line, or None for a line that is cut off or not a record."""
    if not line.endswith("\n"):
        return None
    try:
        if suffix == ".jsonl":
            record = json.loads(line)
            step = record["step"] if isinstance(record, dict) else None
        else:
            fields = next(csv.reader([line]))
            step = int(fields[0]) if len(fields) == len(CSV_COLUMNS) else None
    except (ValueError, KeyError, StopIteration):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def last_logged_step(jsonl: Path) -> int:
    """The largest step recorded in a metrics.jsonl (0 when there is none; lines a kill cut off are skipped)."""
    if not jsonl.is_file():
        return 0
    lines = jsonl.read_bytes().decode("utf-8", errors="replace").splitlines(keepends=True)
    return max((step for line in lines if (step := _record_step(line, ".jsonl")) is not None), default=0)


class MetricsLog:
    """metrics.jsonl (every record), metrics.csv (fixed columns), TensorBoard when installed."""

    def __init__(self, run_dir: Path, resume_step: int):
        self.jsonl, self.csv = run_dir / "metrics.jsonl", run_dir / "metrics.csv"
        self._truncate_after(resume_step)
        new_csv = not self.csv.exists()
        self._csv_file = open(self.csv, "a", newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._csv_file, CSV_COLUMNS, extrasaction="ignore")
        if new_csv:
            self._csv.writeheader()
        self._jsonl_file = open(self.jsonl, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb: Any = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:
            self._tb = None

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records a crashed run wrote after its last checkpoint, and lines it did not finish (a
        kill mid-write leaves a last line without its newline), with a line saying how many."""
        for path in (self.jsonl, self.csv):
            if not path.exists():
                continue
            lines = path.read_bytes().decode("utf-8", errors="replace").splitlines(keepends=True)
            header = [CSV_HEADER] if path.suffix == ".csv" else []
            body = lines[1:] if header and lines and lines[0].rstrip("\r\n") == CSV_HEADER.rstrip() else lines
            records = [(line, _record_step(line, path.suffix)) for line in body if line.strip()]
            broken = sum(s is None for _, s in records)
            if broken:
                notice(f"{path}: dropped {broken} incomplete line(s) (a run was stopped while writing them)")
            kept = [line for line, s in records if s is not None and s <= step]
            write_text(path, "".join(header + kept))

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
