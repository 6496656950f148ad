"""LoRA adapters over the one served base model, loaded at start or hot-swapped while serving.

Names and versions: clients name an adapter in `model`; the server keeps, per public name, the
*entry* it currently resolves to. Each load gets its own PEFT adapter name (`peft_name`), so a
swap of name "a" loads the new weights beside the old ones instead of over them. A request is
pinned to the entry it resolved at admission (`AdapterTable.acquire`), and an entry that was
replaced or deleted (*retired*) stays loaded until its last pinned request is done; then it is
deleted from the PEFT model. So a request in flight finishes on the adapter it started with.

Selection is global state in PEFT (`set_adapter`), so only the batcher's worker thread touches
the model: it decodes one batch at a time, every batch holds requests of one entry (the batch
key includes `peft_name`), and loads and deletions run in the same thread between batches
(`Batcher.call`). Nothing is ever decoded with two adapters mixed.

`check_adapter` reads and checks an adapter directory before the model is touched (clear 4xx
reasons: missing path, not a PEFT LoRA dir, pickled weights only, a layer the served model does
not have or of another shape, another base model); `attach_adapter` then loads it, and undoes a
partial load if PEFT fails anyway.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
SAFETENSORS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class AdapterProblem(ValueError):
    """An adapter that cannot be served, with the HTTP status and error code to answer."""

    def __init__(self, message: str, code: str, status: int = 400, param: str | None = "path"):
        super().__init__(message)
        self.code, self.status, self.param = code, status, param


@dataclass(eq=False)
class AdapterEntry:
    """One loaded adapter: the public name, its PEFT name, where it came from."""

    name: str
    peft_name: str
    version: int  # 1 for the first load of a name, +1 per swap
    source: str | None = None  # the path as given
    path: str | None = None  # the resolved adapter dir
    fingerprint: str | None = None  # sha256 of the adapter dir's files
    loaded_at: str = ""
    base: str | None = None  # base_model_name_or_path in its adapter_config.json
    refs: int = 0  # admitted samples pinned to this entry
    retired: bool = False

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "source": self.source, "path": self.path,
                "fingerprint": self.fingerprint, "loaded_at": self.loaded_at, "base_model": self.base,
                "in_flight": self.refs}


@dataclass
class AdapterTable:
    """Public name -> current entry, plus retired entries still in use; thread-safe."""

    current: dict[str, AdapterEntry] = field(default_factory=dict)
    retired: list[AdapterEntry] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)  # survives a delete: a re-load is a new version
    lock: threading.Lock = field(default_factory=threading.Lock)
    counter: int = 0

    def names(self) -> list[str]:
        with self.lock:
            return list(self.current)

    def next_entry(self, name: str, taken: set[str]) -> AdapterEntry:
        """A fresh entry for `name` (not yet installed) with a PEFT name not in `taken`."""
        with self.lock:
            version = self.versions.get(name, 0) + 1  # recorded by install: a failed load takes no number
            while True:
                self.counter += 1
                # PEFT names are ModuleDict keys: no dots
                peft_name = f"hs{self.counter}_{re.sub(r'[^A-Za-z0-9_]', '_', name)}"
                if peft_name not in taken:
                    return AdapterEntry(name, peft_name, version)

    def install(self, entry: AdapterEntry) -> AdapterEntry | None:
        """Make `entry` what its name resolves to; returns the entry it replaced (now retired)."""
        with self.lock:
            old = self.current.get(entry.name)
            self.current[entry.name] = entry
            self.versions[entry.name] = max(self.versions.get(entry.name, 0), entry.version)
            if old is not None:
                old.retired = True
                self.retired.append(old)
            return old

    def remove(self, name: str) -> AdapterEntry:
        """Retire `name` (KeyError if not served): new requests no longer find it."""
        with self.lock:
            old = self.current.pop(name)
            old.retired = True
            self.retired.append(old)
            return old

    def acquire(self, name: str, n: int = 1) -> AdapterEntry:
        """Pin n samples to the entry `name` resolves to now (KeyError if none)."""
        with self.lock:
            entry = self.current[name]
            entry.refs += n
            return entry

    def release(self, entry: AdapterEntry) -> bool:
        """Unpin one sample; True when the entry is retired and now unused (delete it from the model)."""
        with self.lock:
            entry.refs -= 1
            return entry.retired and entry.refs <= 0

    def unused_retired(self) -> list[AdapterEntry]:
        """Retired entries no request holds, taken off the list (the caller deletes them from the model)."""
        with self.lock:
            done = [e for e in self.retired if e.refs <= 0]
            self.retired = [e for e in self.retired if e.refs > 0]
            return done

    def loaded(self) -> list[AdapterEntry]:
        with self.lock:
            return [*self.current.values(), *self.retired]


# ================================================================================ checks


def check_name(name: Any, base_name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise AdapterProblem(f"name: {name!r} is not a valid adapter name (1-64 characters: letters, digits and "
                             "._:- , starting with a letter or digit)", "invalid_name", param="name")
    if name == base_name:
        raise AdapterProblem(f"name: {name!r} is the base model's name; choose another", "invalid_name",
                             param="name")
    return name


def base_identity(model) -> str | None:
    """The served base model's path as its config records it (None when unknown, e.g. built in memory)."""
    from posttrain.models import base_model

    base = base_model(model)
    path = getattr(getattr(base, "config", None), "_name_or_path", None) or None
    return str(path) if path else None


def same_base(a: str, b: str) -> bool:
    """Whether two base_model_name_or_path values name the same model (local paths compared resolved)."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return os.path.realpath(pa) == os.path.realpath(pb)
    return False


def _base_modules(model) -> dict[str, Any]:
    """name -> module of the base model, with LoRA wrappers seen through (their base_layer)."""
    from posttrain.models import base_model

    base = base_model(model)
    out = {}
    for name, module in base.named_modules():
        if name.endswith(".base_layer") or ".lora_" in name:
            continue
        out[name] = getattr(module, "base_layer", module)
    return out


def read_adapter(spec: str) -> dict[str, Any]:
    """Read and check the adapter directory at `spec` (PEFT dir or run dir) without the model:
    {path, config, shapes (tensor name -> shape), fingerprint, base}. Raises AdapterProblem."""
    from safetensors import safe_open

    from posttrain.models import resolve_model_path
    from posttrain.stage import content_hash

    if not isinstance(spec, str) or not spec.strip():
        raise AdapterProblem("path: give the adapter directory (a PEFT adapter dir or a posttrain run dir)",
                             "invalid_value")
    if not Path(spec).expanduser().exists():
        raise AdapterProblem(f"path: {spec} does not exist on the server (a relative path is relative to the "
                             f"server's working directory, {os.getcwd()})", "adapter_not_found")
    if not Path(spec).expanduser().is_dir():
        raise AdapterProblem(f"path: {spec} is a file; give the adapter directory (a PEFT adapter dir or a "
                             "posttrain run dir)", "invalid_adapter")
    try:
        path = Path(resolve_model_path(str(Path(spec).expanduser())))
    except ValueError as exc:  # ModelLoadError: neither a model, an adapter nor a run dir
        raise AdapterProblem(f"path: {exc}", "invalid_adapter") from None
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise AdapterProblem(f"path: {path} is not a PEFT adapter directory (no adapter_config.json; a full "
                             "model cannot be hot-swapped, only a LoRA adapter over the served base)",
                             "invalid_adapter")
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterProblem(f"path: {cfg_file} is not valid JSON: {exc}", "invalid_adapter") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise AdapterProblem(f"path: {cfg_file}: peft_type {kind!r}; only LoRA adapters (peft_type LORA) are "
                             "served", "invalid_adapter")
    weights = path / SAFETENSORS
    if not weights.is_file():
        pickled = (path / "adapter_model.bin").is_file()
        raise AdapterProblem(f"path: {path} has no {SAFETENSORS}"
                             + (" (a pickled adapter_model.bin is not loaded: convert it to safetensors)"
                                if pickled else ""), "invalid_adapter")
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as exc:  # a truncated or foreign file
        raise AdapterProblem(f"path: {weights} is not a readable safetensors file: {exc}", "invalid_adapter") \
            from None
    if not shapes:
        raise AdapterProblem(f"path: {weights} holds no tensors", "invalid_adapter")
    return {"path": str(path), "config": config, "shapes": shapes, "fingerprint": content_hash(path),
            "base": config.get("base_model_name_or_path") or None}


LORA_KEY = re.compile(r"^(.*)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$")


def check_fits(model, info: dict[str, Any], check_base: bool = True) -> None:
    """Whether the adapter `read_adapter` described applies to the served model: the same base
    model (when both record one and check_base), and every adapted layer present with the sizes
    its LoRA matrices expect. Raises AdapterProblem (409) naming the mismatch."""
    weights = Path(info["path"]) / SAFETENSORS
    served = base_identity(model)
    if check_base and info["base"] and served and not same_base(info["base"], served):
        raise AdapterProblem(f"path: {info['path']} was trained on base model {info['base']}, this server serves "
                             f"{served}; a LoRA adapter only applies to the weights it was trained on (send "
                             "check_base: false if they are the same weights under another path)",
                             "incompatible_base", status=409)
    modules = _base_modules(model)
    for key, shape in info["shapes"].items():
        match = LORA_KEY.match(key)
        if match is None:
            continue  # other saved tensors (DoRA magnitudes, modules_to_save): PEFT checks them
        where = match.group(1)
        where = where[len(PEFT_PREFIX):] if where.startswith(PEFT_PREFIX) else where
        module = modules.get(where)
        if module is None:
            raise AdapterProblem(f"path: {weights}: tensor {key} adapts layer {where}, which the served model "
                                 "does not have (an adapter of another architecture)", "incompatible_base",
                                 status=409)
        kind = match.group(2)
        if kind in ("lora_A", "lora_B") and hasattr(module, "in_features"):
            want = module.in_features if kind == "lora_A" else module.out_features
            got = shape[1] if kind == "lora_A" and len(shape) == 2 else shape[0]
            if len(shape) != 2 or got != want:
                side = "inputs" if kind == "lora_A" else "outputs"
                raise AdapterProblem(f"path: {weights}: {key} has shape {list(shape)}, but the served layer "
                                     f"{where} has {want} {side} (an adapter of a model of another size)",
                                     "incompatible_base", status=409)


# ================================================================================ PEFT


def attach_adapter(model, peft_name: str, path: str):
    """Load the LoRA adapter at `path` as `peft_name` onto `model` (a plain model is wrapped in a
    PeftModel, as `PeftModel.from_pretrained` does); returns the PeftModel. A failed load leaves the
    model as it was (the partly added adapter deleted, or a fresh wrapper unloaded)."""
    from peft import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftConfig, PeftModel

    from posttrain.hf_imports import torchao_hidden

    with torchao_hidden():  # PEFT asks torchao about every layer it wraps
        if isinstance(model, PeftModel):
            try:
                model.load_adapter(path, adapter_name=peft_name)
            except BaseException:
                if peft_name in model.peft_config:
                    model.delete_adapter(peft_name)
                raise
            model.eval()
            return model
        config = PeftConfig.from_pretrained(path)
        config.inference_mode = True
        cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)
        peft_model = cls(model, config, peft_name)  # PEFT raises before changing a layer if none matches
        try:
            peft_model.load_adapter(path, peft_name,
                                    key_mapping=getattr(model, "_checkpoint_conversion_mapping", None) or {})
        except BaseException:
            peft_model.unload()  # the wrapped layers back to plain ones
            raise
    peft_model.eval()
    return peft_model


def detach_adapter(model, peft_name: str):
    """Delete `peft_name` from the PeftModel; the last one unloads the wrapper (returns the plain model)."""
    import warnings

    with warnings.catch_warnings():  # "adapter X was active ... setting active adapter to Y": each batch sets its own
        warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted")
        model.delete_adapter(peft_name)
    if not model.peft_config:
        return model.unload()
    return model
