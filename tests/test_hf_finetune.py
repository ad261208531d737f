"""Fine-tuning an exported MH-MoE model where people fine-tune: transformers' Trainer (router loss included, save,
resume = an uninterrupted run) and PEFT LoRA on the attention projections and on the stacked expert weights
(train, save, load into a fresh model, merge_and_unload). Tiny models in float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from mhmoe.data import ByteTokenizer  # noqa: E402
from mhmoe.hf import MHMoEConfig, MHMoEForCausalLM  # noqa: E402
from mhmoe.hf.runs import hf_tokenizer  # noqa: E402
from mhmoe.hf.standalone import write_remote_code  # noqa: E402

TEXT = Path(__file__).resolve().parents[1] / "src" / "mhmoe" / "data" / "texts" / "udhr-de.txt"
LENGTH = 16


def exported(folder: Path) -> Path:
    """A model folder as `mhmoe export-hf` writes it: MH-MoE in every block, byte tokenizer, remote code."""
    moe = dict(num_heads=2, num_experts=4, top_k=2, expert_hidden=16)
    config = MHMoEConfig(
        vocab_size=257, seq_len=LENGTH, d_model=16, n_layers=2, n_heads=2, tie_word_embeddings=False,
        ffn=dict(kind="mhmoe", moe_every=1, moe=moe), eos_token_id=256, pad_token_id=256,
    )  # fmt: skip
    torch.manual_seed(0)
    MHMoEForCausalLM(config).save_pretrained(folder)
    write_remote_code(folder)
    hf_tokenizer(ByteTokenizer()).save_pretrained(folder)
    return folder


def load(folder: Path) -> MHMoEForCausalLM:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64)


def windows(n: int) -> list[dict[str, torch.Tensor]]:
    """A local dataset: n windows of LENGTH byte ids of a text shipped with the package."""
    ids = torch.tensor(ByteTokenizer().encode(TEXT.read_text(encoding="utf-8")[: n * LENGTH * 2]))
    return [{"input_ids": w, "labels": w} for w in ids[: n * LENGTH].view(n, LENGTH)]


class StopAt(TrainerCallback):
    """Stops training after `step` (an interruption, after the checkpoint of that step is written)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step == self.step
        return control


def trainer(model, out: Path, callbacks=()) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=2, learning_rate=3e-3, save_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=windows(12), callbacks=list(callbacks))


def test_trainer_trains_with_the_router_loss_saves_and_resumes_to_the_same_weights(tmp_path):
    folder = exported(tmp_path / "hf")
    model = load(folder)
    batch = {k: torch.stack([w[k] for w in windows(2)]) for k in ("input_ids", "labels")}
    full = trainer(model, tmp_path / "full")
    loss = full.compute_loss(model, batch)  # what Trainer backpropagates: next-token loss + router loss
    out = model(**batch)
    assert out.aux_loss > 0 and torch.equal(loss, out.lm_loss + out.aux_loss)
    full.train()
    assert full.state.global_step == 4
    interrupted = trainer(load(folder), tmp_path / "resumed", [StopAt(2)])
    interrupted.train()
    assert interrupted.state.global_step == 2 and (tmp_path / "resumed" / "checkpoint-2").is_dir()
    resumed = trainer(load(folder), tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    trained, start = full.model.state_dict(), load(folder).state_dict()
    for name, weight in resumed.model.state_dict().items():
        assert torch.equal(weight, trained[name]), name
    assert not torch.equal(
        trained["model.blocks.0.ffn.moe.router.weight"], start["model.blocks.0.ffn.moe.router.weight"]
    )
    saved = load(tmp_path / "full" / "checkpoint-4")  # a Trainer checkpoint is a model folder again
    assert torch.equal(saved.state_dict()["lm_head.weight"], trained["lm_head.weight"])


LORA = dict(r=2, lora_alpha=4, target_modules=["qkv", "proj"], target_parameters=["experts.w_in", "experts.w_out"])


def test_lora_on_attention_and_experts_trains_saves_loads_and_merges(tmp_path):
    folder = exported(tmp_path / "hf")
    peft = get_peft_model(load(folder), LoraConfig(**LORA))
    names = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert any(".attn.qkv.lora_A" in n for n in names) and any(".attn.proj.lora_B" in n for n in names)
    assert sum(".moe.experts." in n and "lora_A" in n for n in names) == 4  # w_in and w_out of both layers
    assert all("lora_" in n for n in names)  # the base model is frozen
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    batch = {k: torch.stack([w[k] for w in windows(4)]) for k in ("input_ids", "labels")}
    peft.train()
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = peft(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    lora_B = {n: p for n, p in peft.named_parameters() if "lora_B" in n}
    assert all(p.abs().sum() > 0 for p in lora_B.values())  # every adapter, experts included, has trained
    peft.eval()
    ids = batch["input_ids"]
    with torch.no_grad():
        adapted = peft(ids).logits
        assert not torch.allclose(adapted, load(folder)(ids).logits)
    peft.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    loaded = PeftModel.from_pretrained(load(folder), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, adapted)
        merged = loaded.merge_and_unload()
        assert type(merged) is MHMoEForCausalLM and not any("lora" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-12, atol=1e-12)
