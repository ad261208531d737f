"""How close MoE-ified models start to the model they come from (`mhmoe.convert`), on real held-out text.

    python benchmarks/moeify_gap.py RUN_DIR --out results/moeify/NAME.json [--batches 8] [--calibration-steps 300]

RUN_DIR: a `mhmoe train` run, dense or with SMoE layers. The run is exported to the Hugging Face format
(`mhmoe.hf`). A dense run's FFNs are converted with `moeify(init="upcycle")` (SMoE, MH-MoE H = 1, 2, 4); a run
with SMoE layers has those converted to MH-MoE with `moe_to_mhmoe(init="upcycle")` (H = 1, 2, 4: E·H sub-token
experts). Each variant is compared with the source model on the run's test split:
    layer gap   ‖new(x) − old(x)‖ / ‖old(x)‖ per converted layer, on the source model's own layer inputs (mean over layers)
    logits gap  the same ratio for the model's logits
    loss        mean next-token cross-entropy (nats/token), source vs converted
then again after `calibrate` (each layer fitted to the layer it replaced on the validation split's inputs;
skipped when the initial layer gap is below 1e-4, i.e. an exact conversion).
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

from mhmoe.analysis.runs import load_run
from mhmoe.convert import (
    calibrate,
    capture_ffn_io,
    find_dense_ffns,
    find_smoe_layers,
    moe_to_mhmoe,
    moeify,
    relative_error,
)
from mhmoe.convert.wrap import converted_layer
from mhmoe.hf import MHMoEForCausalLM
from mhmoe.hf.runs import export_run

VARIANTS = {  # from a dense run: moeify's recipes
    "smoe E=8 k=2": dict(kind="smoe", num_experts=8, top_k=2),
    "mhmoe H=1 E=8 k=2": dict(kind="mhmoe", num_experts=8, top_k=2, num_heads=1),
    "mhmoe H=2 E=8 k=2": dict(kind="mhmoe", num_experts=8, top_k=2, num_heads=2),
    "mhmoe H=4 E=8 k=2": dict(kind="mhmoe", num_experts=8, top_k=2, num_heads=4),
}
MOE_VARIANTS = {  # from a run with SMoE layers: moe_to_mhmoe's (E·H sub-token experts, the SMoE's top-k)
    "mhmoe H=1 from SMoE": dict(num_heads=1),
    "mhmoe H=2 from SMoE": dict(num_heads=2),
    "mhmoe H=4 from SMoE": dict(num_heads=4),
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
        gaps = [relative_error(converted_layer(model, n)(x).y, y) for n, (x, y) in io.items()]
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
    names = find_smoe_layers(dense) or [n for n, _ in find_dense_ffns(dense)]
    source = "moe" if find_smoe_layers(dense) else "dense"
    test_io = capture_ffn_io(dense, [w[:, :-1] for w in test], names)
    valid_io = capture_ffn_io(dense, [w[:, :-1] for w in valid], names)
    dense_loss, dense_logits = evaluate(dense, test)
    rows = []
    for label, recipe in (MOE_VARIANTS if source == "moe" else VARIANTS).items():
        started = time.perf_counter()
        model = copy.deepcopy(dense)
        if source == "moe":
            moe_to_mhmoe(model, **recipe)
        else:
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
        source=source,
        step=run.step,
        test_tokens=args.batches * bs * length,
        calibration_steps=args.calibration_steps,
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"),
        rows=rows,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("| variant | layer gap (init) | logits gap (init) | loss source → init | layer gap (cal.) | loss (cal.) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['init_layer_gap']:.3f} | {r['init_logits_gap']:.3f} | "
            f"{r['dense_loss']:.3f} → {r['init_loss']:.3f} | {r['calibrated_layer_gap']:.3f} | "
            f"{r['calibrated_loss']:.3f} |"
        )


if __name__ == "__main__":
    main()
