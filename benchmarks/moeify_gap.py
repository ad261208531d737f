"""How close MoE-ified models start to the dense model they come from (`mhmoe.convert`), on real held-out text.

    python benchmarks/moeify_gap.py RUN_DIR --out results/moeify/NAME.json [--batches 8] [--calibration-steps 300]

RUN_DIR: a dense `mhmoe train` run. The run is exported to the Hugging Face format (`mhmoe.hf`), each variant is
converted with `moeify(init="upcycle")` and compared with the dense model on the run's test split:
    layer gap   ‖MoE(x) − FFN(x)‖ / ‖FFN(x)‖ per converted layer, on the dense model's own FFN inputs (mean over layers)
    logits gap  the same ratio for the model's logits
    loss        mean next-token cross-entropy (nats/token), dense vs converted
then again after `calibrate` (each layer fitted to its dense FFN on the validation split's FFN inputs; skipped
when the initial layer gap is below 1e-4, i.e. exact upcycling).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from mhmoe.train.runs import load_run

from mhmoe.convert import calibrate, capture_ffn_io, find_dense_ffns, moeify, relative_error
from mhmoe.hf import MHMoEForCausalLM
from mhmoe.hf.runs import export_run

VARIANTS = {
    "smoe E=8 k=2": dict(kind="smoe", num_experts=8, top_k=2),
    "mhmoe H=1 E=8 k=2": dict(kind="mhmoe", num_experts=8, top_k=2, num_heads=1),
    "mhmoe H=2 E=8 k=2": dict(kind="mhmoe", num_experts=8, top_k=2, num_heads=2),
    "mhmoe H=4 E=8 k=2": dict(kind="mhmoe", num_experts=8, top_k=2, num_heads=4),
}


def batches(tokens, count: int, batch: int, length: int) -> list[torch.Tensor]:
    """Consecutive (batch, length + 1) windows from the start of a split."""
    need = count * batch * (length + 1)
    data = torch.as_tensor(tokens[:need].astype("int64")).view(count, batch, length + 1)
    return list(data)


@torch.no_grad()
def evaluate(model, windows: list[torch.Tensor]) -> tuple[float, torch.Tensor]:
    losses, logits = [], []
    for w in windows:
        out = model(w[:, :-1]).logits
        losses.append(F.cross_entropy(out.flatten(0, 1).float(), w[:, 1:].flatten()))
        logits.append(out)
    return float(torch.stack(losses).mean()), torch.cat(logits)


def layer_gap(model, io: dict) -> float:
    with torch.no_grad():
        gaps = [relative_error(model.get_submodule(n).moe(x).y, y) for n, (x, y) in io.items()]
    return sum(gaps) / len(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--calibration-steps", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    run = load_run(args.run_dir)
    with tempfile.TemporaryDirectory() as tmp:
        export_run(args.run_dir, Path(tmp) / "hf")
        dense = MHMoEForCausalLM.from_pretrained(Path(tmp) / "hf").eval()
    length, bs = run.cfg.model.seq_len, run.cfg.train.batch_size
    test = batches(run.splits["test"], args.batches, bs, length)
    valid = batches(run.splits["valid"], args.batches, bs, length)
    names = [n for n, _ in find_dense_ffns(dense)]
    test_io = capture_ffn_io(dense, [w[:, :-1] for w in test], names)
    valid_io = capture_ffn_io(dense, [w[:, :-1] for w in valid], names)
    dense_loss, dense_logits = evaluate(dense, test)
    rows = []
    for label, recipe in VARIANTS.items():
        started = time.perf_counter()
        model = copy.deepcopy(dense)
        moeify(model, **recipe)
        model.eval()
        loss, logits = evaluate(model, test)
        row = dict(variant=label, recipe=recipe, dense_loss=dense_loss, init_loss=loss)
        row.update(init_layer_gap=layer_gap(model, test_io), init_logits_gap=relative_error(logits, dense_logits))
        if row["init_layer_gap"] > 1e-4:  # exact upcycling (SMoE, H = 1) has nothing to calibrate
            calibrate(model, valid_io, steps=args.calibration_steps, lr=1e-3, progress=True)
            model.eval()
            loss, logits = evaluate(model, test)
        row.update(calibrated_loss=loss, calibrated_layer_gap=layer_gap(model, test_io))
        row.update(calibrated_logits_gap=relative_error(logits, dense_logits), seconds=time.perf_counter() - started)
        rows.append(row)
        print(json.dumps(row))
    report = dict(
        run_dir=str(args.run_dir),
        step=run.step,
        test_tokens=args.batches * bs * length,
        calibration_steps=args.calibration_steps,
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"),
        rows=rows,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("| variant | layer gap (init) | logits gap (init) | loss dense → init | layer gap (cal.) | loss (cal.) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['init_layer_gap']:.3f} | {r['init_logits_gap']:.3f} | "
            f"{r['dense_loss']:.3f} → {r['init_loss']:.3f} | {r['calibrated_layer_gap']:.3f} | "
            f"{r['calibrated_loss']:.3f} |"
        )


if __name__ == "__main__":
    main()
