"""mhmoe train run directories <-> Hugging Face model folders, losslessly (identical logits both ways).

Export (`export_run`, `mhmoe export-hf RUN_DIR OUT_DIR`): the run's latest checkpoint (sha256-verified) becomes
    config.json             MHMoEConfig; `mhmoe_run` records the run config, step and data position
    model.safetensors       the weights: the decoder under `model.`, the output layer as `lm_head.weight`
                            (tied embeddings stored once)
    generation_config.json  eos / pad = the tokenizer's end-of-text id
    configuration_mhmoe.py, modeling_mhmoe.py, mhmoe_*.py   remote code (`mhmoe.hf.standalone`), named in
                            config.json's auto_map: `AutoModelForCausalLM.from_pretrained(OUT_DIR,
                            trust_remote_code=True)` loads the folder where mhmoe is not installed
    tokenizer.json, tokenizer_config.json, special_tokens_map.json   a `PreTrainedTokenizerFast`, so
                            `AutoTokenizer.from_pretrained(OUT_DIR)` works offline. A BPE run exports its own
                            tokenizer.json; a byte-tokenizer run exports an equivalent byte-level BPE without merges
                            (ids 0..255 = bytes, 256 = <|endoftext|>), which encodes every text to the same ids.
    mhmoe_manifest.json     the sha256 and size of every other file, written last; `import_run` verifies it
Import (`import_run`, `mhmoe import-hf HF_DIR RUN_DIR`): a folder saved by `MHMoEForCausalLM.save_pretrained`
becomes a run directory with config.json, tokenizer.json and one checkpoint that `mhmoe eval / analyze /
export-hf` read. The optimiser state is not part of the Hugging Face format: `mhmoe train` on an imported run
continues with fresh AdamW moments, from the exported step and data position when the folder came from
`export_run` (else it has no data position, and training on it is refused by the sampler check).

Both write into a temporary sibling folder and rename it into place, so a crash leaves no half-written output;
both refuse an existing non-empty destination. Weights load from safetensors only, and a folder is checked before
transformers sees it (`check_model_folder`): a weights index naming anything but a safetensors shard of the
folder, or a "safetensors" file that is not one (a renamed pickle), is refused before anything is read, and
weights that do not build the model the config describes (a tensor missing, unexpected or of another shape) are
refused after (`load_checked`). An exported folder whose files differ from its manifest is refused. Files
copied out of a folder (tokenizers) must be regular files in it (`folder_file`): a symbolic link to elsewhere
would copy any readable file of the machine into the output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mhmoe.errors import CheckpointError, UserError
from mhmoe.hf.files import folder_file, load_checked, read_json_file
from mhmoe.hf.standalone import write_remote_code
from mhmoe.io import atomic_write, notice, staged_dir, write_json
from mhmoe.models.gpt import GPT

BYTE_EOS = "<|endoftext|>"
MANIFEST = "mhmoe_manifest.json"  # the sha256 and size of every other file of an exported folder
MANIFEST_FORMAT = "mhmoe-hf-export/1"


def byte_tokenizer_as_bpe() -> Any:
    """A `tokenizers.Tokenizer` giving `mhmoe.data.ByteTokenizer`'s ids: byte-level BPE without merges, the 256
    bytes as ids 0..255 in byte order, <|endoftext|> = 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from mhmoe.data.tokenizer import bytes_to_unicode

    vocab = {char: b for b, char in bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([BYTE_EOS])
    return tokenizer


def hf_tokenizer(tokenizer: Any) -> Any:
    """The run tokenizer (`mhmoe.data` ByteTokenizer or BPETokenizer) as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if tokenizer.name == "byte":
        backend, eos = byte_tokenizer_as_bpe(), BYTE_EOS
    else:
        backend, eos = Tokenizer.from_str(tokenizer.tokenizer.to_str()), tokenizer.eos_token
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=eos)


def _read_run(run_dir: Path) -> tuple[Any, GPT, Any, dict]:
    """(RunConfig, GPT at the latest verified checkpoint, tokenizer, state.json) without tokenizing any data."""
    from mhmoe.data import ByteTokenizer, load_tokenizer
    from mhmoe.train.checkpoint import load_model_weights, run_checkpoint
    from mhmoe.train.config import RunConfig

    with run_checkpoint(run_dir) as (config, checkpoint):
        cfg = RunConfig.from_dict(config)
        model = GPT(cfg.model)
        load_model_weights(checkpoint, model)
        state = json.loads((checkpoint / "state.json").read_text())
    saved = run_dir / "tokenizer.json"
    if saved.exists():
        tokenizer = load_tokenizer(saved)
    elif cfg.data.tokenizer == "byte":
        tokenizer = ByteTokenizer()
    else:
        raise CheckpointError(f"{run_dir} has no tokenizer.json (data.tokenizer={cfg.data.tokenizer!r})")
    return cfg, model.eval(), tokenizer, state


def export_run(run_dir: Path, out_dir: Path) -> Path:
    """Write the run's latest checkpoint as a Hugging Face model folder (see the module doc); return out_dir."""
    from mhmoe.hf.modeling_mhmoe import MHMoEForCausalLM
    from mhmoe.train.checkpoint import write_safetensors

    cfg, model, tokenizer, state = _read_run(run_dir)
    record = {
        "run_config": cfg.to_dict(),
        "step": state["step"],
        "trainer_state": {k: state[k] for k in ("sampler", "tokens_seen", "train_seconds") if k in state},
    }
    eos = tokenizer.eos_id
    hf = MHMoEForCausalLM.from_gpt(model, mhmoe_run=record, eos_token_id=eos, pad_token_id=eos)
    with staged_dir(out_dir) as tmp:  # a full disk: one line naming the file (`write_safetensors`), nothing left
        write_safetensors(lambda _: hf.save_pretrained(tmp), tmp / "model.safetensors")
        write_remote_code(tmp)  # loadable with trust_remote_code=True where mhmoe is not installed
        hf_tokenizer(tokenizer).save_pretrained(tmp)
        write_json(tmp / MANIFEST, {"format": MANIFEST_FORMAT, "files": _file_hashes(tmp, sorted(tmp.iterdir()))})
    return out_dir


def _file_hashes(folder: Path, files: list[Path]) -> dict[str, dict]:
    """{name: {sha256, bytes}} of regular files of `folder` (links inside it, as in a hub cache, followed)."""
    from mhmoe.train.checkpoint import _sha256

    return {f.name: {"sha256": _sha256(folder_file(f, folder).resolve()), "bytes": f.stat().st_size} for f in files}


def verify_export(hf_dir: Path) -> bool:
    """Check an exported folder against its manifest (`MANIFEST`, written by `export_run`): every file it lists
    present and unchanged, and no file it does not list that a loader reads (weights, JSON, code, vocabularies).
    False for a folder without one (saved by `save_pretrained`, or exported by an older mhmoe); a UserError naming
    the files otherwise."""
    manifest_path = hf_dir / MANIFEST
    if not manifest_path.exists() and not manifest_path.is_symlink():
        return False
    manifest = read_json_file(manifest_path, hf_dir)
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{manifest_path} is malformed: the folder was altered; export it again")
    present = [f for f in sorted(hf_dir.iterdir()) if f.name in listed]
    found = _file_hashes(hf_dir, present)
    changed = [name for name in sorted(listed) if found.get(name) != listed[name]]
    planted = [f.name for f in sorted(hf_dir.iterdir()) if f.name not in listed and f.name != MANIFEST
               and f.suffix in (".json", ".safetensors", ".py", ".txt", ".model")]  # fmt: skip
    if changed or planted:
        what = [f"{', '.join(changed[:3])} missing or changed"] if changed else []
        what += [f"{', '.join(planted[:3])} added"] if planted else []
        raise UserError(
            f"{hf_dir} differs from what `mhmoe export-hf` wrote ({'; '.join(what)}; {MANIFEST} has the sha256 of "
            f"each file): export it again, or delete {MANIFEST} to import the edited folder unchecked"
        )
    return True


def import_run(hf_dir: Path, run_dir: Path) -> Path:
    """Make a run directory from a folder saved by `MHMoEForCausalLM.save_pretrained` (see the module doc)."""
    from mhmoe.hf.modeling_mhmoe import MHMoEForCausalLM
    from mhmoe.train.checkpoint import save_checkpoint
    from mhmoe.train.config import RunConfig
    from mhmoe.train.loop import make_optimizer

    verified = verify_export(Path(hf_dir))
    hf = load_pretrained(MHMoEForCausalLM, hf_dir)
    if not verified:
        notice(f"{hf_dir} has no {MANIFEST} (it was not written by `mhmoe export-hf`): its files were checked for "
               "weights that fit its config, not against the sha256 of an export")  # fmt: skip
    model = hf.to_gpt()
    record = hf.config.mhmoe_run or {}
    cfg = RunConfig.from_dict(record["run_config"]) if "run_config" in record else RunConfig(model=model.cfg)
    cfg.model = model.cfg
    byte_run = cfg.data.tokenizer == "byte"
    tokenizer_bytes = b"" if byte_run else _tokenizer_file(Path(hf_dir))
    with staged_dir(run_dir) as tmp:
        write_json(tmp / "config.json", cfg.to_dict())
        if not byte_run:  # a byte run keeps no tokenizer file (data.tokenizer = "byte" says it all)
            with atomic_write(tmp / "tokenizer.json", "wb") as f:
                f.write(tokenizer_bytes)
        state = {"imported_from": str(hf_dir), **record.get("trainer_state", {})}
        optimizer = make_optimizer(model.parameters(), cfg.train)
        step = int(record.get("step", 0))
        save_checkpoint(tmp / "checkpoints", step, model, optimizer, state, run_files=("config.json", "tokenizer.json"))
    return run_dir


def _tokenizer_file(hf_dir: Path) -> bytes:
    """The bytes of hf_dir's tokenizer.json, checked to be a regular file of the folder that loads as a tokenizer."""
    from mhmoe.data import load_tokenizer

    file = hf_dir / "tokenizer.json"
    if not file.exists() and not file.is_symlink():
        raise UserError(f"{hf_dir} has no tokenizer.json; an mhmoe run needs its tokenizer")
    file = folder_file(file, hf_dir)
    try:
        load_tokenizer(file)
    except Exception as e:  # tokenizers raises its own exception types for a file that is not a tokenizer
        raise UserError(f"{file} is not a tokenizer ({str(e).splitlines()[0][:100]}); export the model again") from None
    return file.read_bytes()


def load_pretrained(model_class: Any, path: Path | str, **kwargs: Any) -> Any:
    """`model_class.from_pretrained(path, use_safetensors=True)` through `load_checked` (a hostile folder, or
    weights that do not build the model, refused with one line), and a one-line error for a folder that is not
    one."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a Hugging Face model folder (no config.json)")
    try:
        return load_checked(model_class.from_pretrained, model_class, str(path), use_safetensors=True, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load {path} (safetensors weights only): {str(e).splitlines()[0]}") from e
