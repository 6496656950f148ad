"""Parameter-efficient methods: full, freeze, PEFT (LoRA/DoRA/IA3/prompt tuning), bottleneck adapters.

`apply_adapter(model, cfg)` is the one entry point: it decides which parameters train
and (by default) keeps trainable parameters in fp32 while a frozen base may stay bf16,
the fast shape on CPUs with native bf16. PEFT methods are PEFT's own code and save in
PEFT's format. Bottleneck adapters (Houlsby-style, several named tasks in one model,
routed per token) are ours: small modules hooked after each decoder layer's attention
and/or MLP, saved beside the base model as `BOTTLENECK_FILE` + `BOTTLENECK_CONFIG`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import re
from pathlib import Path
from typing import Any, Iterator, Literal

import pydantic
import torch
from torch import nn

from posttrain.fileio import atomic_write

BOTTLENECK_FILE = "bottleneck_adapters.safetensors"
BOTTLENECK_CONFIG = "bottleneck_config.json"
PEFT_METHODS = ("lora", "dora", "ia3", "prompt")
_TASK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


class AdapterConfig(pydantic.BaseModel):
    """Which parameters train, and how. One method per model."""

    model_config = pydantic.ConfigDict(extra="forbid")

    method: Literal["full", "freeze", "lora", "dora", "ia3", "prompt", "bottleneck"] = "lora"
    # LoRA / DoRA (target_modules also used by IA3)
    r: int = pydantic.Field(16, gt=0)
    alpha: float = pydantic.Field(32, gt=0)
    dropout: float = pydantic.Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"
    # IA3: modules whose *input* is scaled; None = PEFT's per-architecture default
    # (only allowed with target_modules="all-linear", which then also means PEFT's default targets)
    feedforward_modules: list[str] | None = None
    # freeze
    freeze_layers: int = 0  # first k decoder layers
    freeze_patterns: list[str] = []  # glob on parameter names, or "re:<regex>"
    freeze_embeddings: bool = False  # input embeddings (and a tied lm_head)
    # prompt tuning
    num_virtual_tokens: int = pydantic.Field(20, gt=0)
    prompt_init_text: str | None = None  # needs the tokenizer passed to apply_adapter
    # bottleneck
    bottleneck_size: int = pydantic.Field(64, gt=0)
    tasks: list[str] = []
    where: list[Literal["attn", "mlp"]] = ["attn", "mlp"]
    # dtype of the parameters that train ("fp32": adapters in fp32 over a base that may stay
    # bf16; for full/freeze the whole model goes fp32, see apply_adapter)
    trainable_dtype: Literal["fp32", "same"] = "fp32"
    # PEFT methods: start from a saved adapter's weights instead of a fresh init (an adapter dir or a
    # run dir whose final/ is one; the same method and shapes as these settings): continue training
    # it, e.g. one round of a feedback loop after the last. Its files' hash goes in the manifest.
    init_from: str | None = None

    @pydantic.field_validator("freeze_layers")
    @classmethod
    def _non_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"freeze_layers must be >= 0, got {v}")
        return v

    @pydantic.field_validator("target_modules")
    @classmethod
    def _targets(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, str) and not v.strip():
            raise ValueError("target_modules is empty; use 'all-linear' or a list of module names")
        if isinstance(v, list) and (not v or any(not s for s in v)):
            raise ValueError(f"target_modules must be a non-empty list of module names, got {v!r}")
        return v

    @pydantic.field_validator("freeze_patterns")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p or p == "re:":
                raise ValueError("freeze_patterns has an empty pattern")
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as exc:
                    raise ValueError(f"freeze_patterns: bad regex {p!r}: {exc}") from exc
        return v

    @pydantic.field_validator("tasks")
    @classmethod
    def _task_names(cls, v: list[str]) -> list[str]:
        for t in v:
            if not _TASK_NAME.match(t):
                raise ValueError(f"tasks: {t!r} is not a valid task name (letters, digits, _ and -, not starting with a digit)")
        dup = sorted({t for t in v if v.count(t) > 1})
        if dup:
            raise ValueError(f"tasks: duplicate names {dup}")
        return v

    @pydantic.field_validator("where")
    @classmethod
    def _where(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("where must name at least one of 'attn', 'mlp'")
        if len(set(v)) != len(v):
            raise ValueError(f"where has duplicates: {v}")
        return v

    @pydantic.model_validator(mode="after")
    def _method_needs(self) -> "AdapterConfig":
        if self.method == "bottleneck" and not self.tasks:
            raise ValueError("tasks: method 'bottleneck' needs at least one task name (e.g. tasks: [default])")
        if self.method == "freeze" and not (self.freeze_layers or self.freeze_patterns or self.freeze_embeddings):
            raise ValueError(
                "freeze_layers/freeze_patterns/freeze_embeddings: method 'freeze' freezes nothing; "
                "set one of them or use method 'full'"
            )
        if self.method == "ia3" and self.feedforward_modules is None and self.target_modules != "all-linear":
            raise ValueError("feedforward_modules: IA3 with an explicit target_modules list needs feedforward_modules too")
        if self.init_from is not None and self.method not in PEFT_METHODS:
            raise ValueError(f"init_from: starts a PEFT adapter ({', '.join(PEFT_METHODS)}) from saved weights; "
                             f"method is {self.method}")
        if self.feedforward_modules is not None:
            targets = self.target_modules if isinstance(self.target_modules, list) else []
            extra = [m for m in self.feedforward_modules if m not in targets]
            if extra:
                raise ValueError(f"feedforward_modules {extra} must also be listed in target_modules")
        return self


# ----------------------------------------------------------------------------- helpers


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the transformer blocks, e.g. ('model.layers', ...)."""
    candidates = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks") and len(m)
    ]
    if not candidates:
        raise ValueError(f"{type(model).__name__}: no decoder layer list (layers/h/blocks) found")
    return candidates[0]


def trainable_summary(model: nn.Module) -> dict[str, Any]:
    """Trainable/total parameter counts (tied weights counted once) and a line to print."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    pct = 100.0 * trainable / total if total else 0.0
    return {
        "trainable": trainable,
        "total": total,
        "percent": pct,
        "line": f"trainable params: {trainable:,} of {total:,} ({pct:.4g}%)",
    }


def _cast_trainable(model: nn.Module, dtype: torch.dtype, everything: bool = False) -> None:
    for p in model.parameters():
        if (p.requires_grad or everything) and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)  # keeps the Parameter object, so ties survive


def _pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


# ----------------------------------------------------------------------------- apply


def apply_adapter(model: nn.Module, cfg: AdapterConfig, tokenizer=None) -> nn.Module:
    """Set up `model` for training with `cfg.method`; returns the (possibly wrapped) model.

    PEFT methods return a `peft.PeftModel`; the others modify `model` in place.
    `tokenizer` is needed only for prompt tuning initialised from text.
    """
    if getattr(model, "_posttrain_bottleneck", None) is not None or hasattr(model, "peft_config"):
        raise ValueError("apply_adapter: this model already carries adapters; apply one method to a plain model")
    if cfg.method in ("full", "freeze"):
        _apply_freeze(model, cfg)
    elif cfg.method in PEFT_METHODS:
        model = _apply_peft(model, cfg, tokenizer)
    else:
        _apply_bottleneck(model, cfg)
    if cfg.trainable_dtype == "fp32":
        # full/freeze: a Llama with bf16 frozen layers and fp32 trainable ones does not run
        # (rotary embeddings promote q/k to fp32 while v stays bf16, and SDPA refuses), so
        # "fp32" there means the whole model in fp32; use "same" for pure bf16 training.
        _cast_trainable(model, torch.float32, everything=cfg.method in ("full", "freeze"))
    return model


def _apply_freeze(model: nn.Module, cfg: AdapterConfig) -> None:
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.method == "full":
        return
    names = [n for n, _ in model.named_parameters()]
    frozen: set[str] = set()
    if cfg.freeze_layers:
        prefix, layers = decoder_layers(model)
        if cfg.freeze_layers > len(layers):
            raise ValueError(f"freeze_layers={cfg.freeze_layers} but the model has {len(layers)} decoder layers")
        for i in range(cfg.freeze_layers):
            frozen |= {n for n in names if n.startswith(f"{prefix}.{i}.")}
    for pattern in cfg.freeze_patterns:
        hit = {n for n in names if _pattern_matches(pattern, n)}
        if not hit:
            raise ValueError(f"freeze_patterns: {pattern!r} matches no parameter (e.g. {names[0]!r})")
        frozen |= hit
    if cfg.freeze_embeddings:
        emb = model.get_input_embeddings()
        frozen |= {n for n, p in model.named_parameters() if p is emb.weight}
    params = dict(model.named_parameters())
    for n in frozen:
        params[n].requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("freeze: the settings freeze every parameter; nothing would train")


def _apply_peft(model: nn.Module, cfg: AdapterConfig, tokenizer) -> nn.Module:
    from posttrain.hf_imports import import_transformers_models, torchao_hidden

    import_transformers_models()  # before peft, which imports transformers' model code
    import peft

    common = {"task_type": peft.TaskType.CAUSAL_LM}
    if cfg.method in ("lora", "dora"):
        pcfg = peft.LoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
            use_dora=cfg.method == "dora", **common,
        )
    elif cfg.method == "ia3":
        default = cfg.target_modules == "all-linear"  # PEFT's per-architecture IA3 targets
        pcfg = peft.IA3Config(
            target_modules=None if default else cfg.target_modules,
            feedforward_modules=None if default else cfg.feedforward_modules,
            **common,
        )
    else:
        if cfg.prompt_init_text is not None and tokenizer is None:
            raise ValueError("prompt_init_text: prompt tuning from text needs the tokenizer passed to apply_adapter")
        pcfg = peft.PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **common)
    for p in model.parameters():
        p.requires_grad_(False)
    experts = [n for n, p in model.named_parameters() if p.dim() == 3]
    if experts and cfg.method in ("lora", "dora", "ia3"):  # transformers 5 stacks MoE experts in 3-D tensors
        logging.getLogger("posttrain").warning(
            "%s: %s's routed MoE experts (%d stacked 3-D weights, e.g. %s) get no adapter: target_modules %s "
            "matches nn.Linear layers only (attention, shared expert)", cfg.method,
            getattr(model.config, "model_type", None), len(experts), experts[0], cfg.target_modules)
    with torchao_hidden():  # PEFT asks torchao about every layer it wraps
        wrapped = peft.get_peft_model(model, pcfg, autocast_adapter_dtype=cfg.trainable_dtype == "fp32")
    if cfg.init_from is not None:
        _load_init_weights(wrapped, cfg, cfg.init_from)
    elif cfg.method == "prompt" and cfg.prompt_init_text is not None:
        _init_prompt_from_text(wrapped, tokenizer, cfg.prompt_init_text, cfg.num_virtual_tokens)
    return wrapped


PEFT_TYPES = {"lora": "LORA", "dora": "LORA", "ia3": "IA3", "prompt": "PROMPT_TUNING"}


def init_adapter_dir(spec: str | Path) -> Path:
    """The PEFT adapter dir `init_from` names: the dir itself, or a run dir's final/."""
    path = Path(spec).expanduser()
    for candidate in (path, path / "final"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise ValueError(f"init_from: {spec} is not a PEFT adapter directory or a run dir whose final/ is one "
                     "(no adapter_config.json)" if path.exists() else f"init_from: {spec} does not exist")


@torch.no_grad()
def _load_init_weights(wrapped: nn.Module, cfg: AdapterConfig, spec: str) -> None:
    """Copy a saved adapter's weights into the fresh one `wrapped` carries. The saved settings must
    match `cfg` (method, r, alpha: a different scale would silently change the function) and every
    tensor must fill one of ours with the same shape, and all of ours must be filled."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = init_adapter_dir(spec)
    try:
        saved = json.loads((path / "adapter_config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"init_from: {path / 'adapter_config.json'} is not valid JSON: {exc}") from None
    want = {"peft_type": PEFT_TYPES[cfg.method]}
    if cfg.method in ("lora", "dora"):
        want.update(r=cfg.r, lora_alpha=cfg.alpha, use_dora=cfg.method == "dora")
    elif cfg.method == "prompt":
        want.update(num_virtual_tokens=cfg.num_virtual_tokens)
    for key, value in want.items():
        got = saved.get(key, False if key == "use_dora" else None)
        if got != value and not (isinstance(value, float) and isinstance(got, (int, float)) and float(got) == value):
            raise ValueError(f"init_from: {path} was saved with {key}={got!r}; these adapter settings give "
                             f"{value!r} (make them match the saved adapter)")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise ValueError(f"init_from: {path} has no adapter_model.safetensors (pickled weights are not loaded)")
    state = load_file(str(weights))
    try:
        result = set_peft_model_state_dict(wrapped, state)
    except RuntimeError as exc:  # torch's size-mismatch report, one line per tensor
        raise ValueError(f"init_from: {weights} does not fit these adapter settings: "
                         f"{str(exc).strip().splitlines()[-1].strip()}") from None
    ours = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    missing = sorted(n for n in ours if n in set(result.missing_keys))
    unexpected = sorted(getattr(result, "unexpected_keys", []))
    if cfg.method == "prompt":  # PEFT loads the prompt encoder apart from load_state_dict (and checks it)
        missing = [n for n in missing if not n.startswith("prompt_encoder.")]
        unexpected = [n for n in unexpected if n != "prompt_embeddings"]
    if missing or unexpected:
        what = f"tensors not in the saved file: {missing[:3]}" if missing else f"saved tensors we do not have: {unexpected[:3]}"
        raise ValueError(f"init_from: {weights} does not fit these adapter settings ({what}"
                         f"{' ...' if len(missing or unexpected) > 3 else ''}); target_modules must match too")


@torch.no_grad()
def _init_prompt_from_text(model, tokenizer, text: str, n: int) -> None:
    """Start the virtual tokens at the embeddings of `text` (repeated/truncated to n tokens)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("prompt_init_text tokenizes to nothing")
    ids = (ids * (n // len(ids) + 1))[:n]
    emb = model.get_input_embeddings()(torch.tensor(ids, device=model.get_input_embeddings().weight.device))
    table = model.prompt_encoder[model.active_adapter].embedding.weight
    table.copy_(emb.to(table.dtype))


# ----------------------------------------------------------------------------- bottleneck


class _RouteState:
    """Routing shared by every bottleneck site of one model (plain object, not a Module)."""

    def __init__(self, tasks: list[str]):
        self.tasks = list(tasks)
        self.task_ids: torch.Tensor | None = None  # set by route_tasks
        self.default: int | None = None  # set by set_default_task; -1 = base model


class Bottleneck(nn.Module):
    """down -> GELU -> up; `up` starts at zero so the model is unchanged at start."""

    def __init__(self, hidden: int, size: int, dtype: torch.dtype):
        super().__init__()
        self.down = nn.Linear(hidden, size, dtype=dtype)
        self.up = nn.Linear(size, hidden, dtype=dtype)
        self.act = nn.GELU()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class BottleneckSite(nn.Module):
    """All task adapters at one place (one layer's attention or MLP output).

    Registered as a child of the hooked module (`...self_attn.bottleneck`), and its
    `hook` method is the forward hook, so deepcopy of the model copies it correctly.
    """

    def __init__(self, hidden: int, size: int, state: _RouteState, dtype: torch.dtype):
        super().__init__()
        self.adapters = nn.ModuleDict({t: Bottleneck(hidden, size, dtype) for t in state.tasks})
        self.state = state

    def hook(self, module: nn.Module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h + self.delta(h)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        ids = _current_ids(self.state, h)
        dtype = next(self.parameters()).dtype
        if ids is None:  # one task for every token
            idx = self.state.default
            return self.adapters[self.state.tasks[idx]](h.to(dtype)).to(h.dtype) if idx >= 0 else torch.zeros_like(h)
        out = torch.zeros(h.shape, dtype=dtype, device=h.device)
        for t in ids.unique().tolist():
            if t < 0:
                continue
            rows = ids == t
            out[rows] = self.adapters[self.state.tasks[t]](h[rows].to(dtype))
        return out.to(h.dtype)


def _current_ids(state: _RouteState, h: torch.Tensor) -> torch.Tensor | None:
    """Per-token task ids [B,T] for hidden states h [B,T,H], or None when one task applies to all."""
    ids = state.task_ids
    if ids is None:
        if state.default is None:
            raise RuntimeError(
                "bottleneck adapters: no task chosen for this forward; wrap it in "
                "route_tasks(model, task_ids) or call set_default_task(model, name)"
            )
        return None
    if ids.dim() == 1:
        ids = ids[:, None].expand(h.shape[0], h.shape[1])
    if ids.shape != h.shape[:2]:
        raise ValueError(
            f"route_tasks: task_ids shape {tuple(ids.shape)} does not match the batch {tuple(h.shape[:2])}; "
            "pass [B] ids (one task per row) for generation with a KV cache"
        )
    return ids.to(h.device)


def _apply_bottleneck(model: nn.Module, cfg: AdapterConfig) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    base_dtype = next(model.parameters()).dtype
    dtype = torch.float32 if cfg.trainable_dtype == "fp32" else base_dtype
    hidden = model.config.hidden_size
    state = _RouteState(cfg.tasks)
    if len(cfg.tasks) == 1:
        state.default = 0
    prefix, layers = decoder_layers(model)
    ignore = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    for i, layer in enumerate(layers):
        for where in cfg.where:
            attr = {"attn": "self_attn", "mlp": "mlp"}[where]
            target = getattr(layer, attr, None)
            if target is None:
                raise ValueError(f"bottleneck: {type(layer).__name__} has no '{attr}' module for where={where!r}")
            device = next(target.parameters()).device
            site = BottleneckSite(hidden, cfg.bottleneck_size, state, dtype).to(device)
            target.bottleneck = site
            target.register_forward_hook(site.hook)
            ignore |= {f"{prefix}.{i}.{attr}.bottleneck.{k}" for k in site.state_dict()}
    # save_pretrained must write a clean base model; the adapters go to BOTTLENECK_FILE
    model._keys_to_ignore_on_save = ignore
    model._posttrain_bottleneck = {
        "tasks": list(cfg.tasks), "bottleneck_size": cfg.bottleneck_size, "where": list(cfg.where),
        "state": state,
    }


def _bottleneck_state(model: nn.Module) -> _RouteState:
    model = getattr(model, "module", model)  # DDP/accelerate wrappers
    info = getattr(model, "_posttrain_bottleneck", None)
    if info is None:
        raise ValueError("this model has no bottleneck adapters (apply_adapter with method='bottleneck')")
    return info["state"]


@contextlib.contextmanager
def route_tasks(model: nn.Module, task_ids: torch.Tensor) -> Iterator[None]:
    """Route each token ([B,T] ids) or row ([B] ids) to its task's adapter; -1 = no adapter."""
    state = _bottleneck_state(model)
    if task_ids.dtype not in (torch.int64, torch.int32) or task_ids.dim() not in (1, 2):
        raise ValueError(f"route_tasks: task_ids must be an integer [B] or [B,T] tensor, got {task_ids.dtype} {tuple(task_ids.shape)}")
    if task_ids.numel() and (task_ids.min() < -1 or task_ids.max() >= len(state.tasks)):
        raise ValueError(f"route_tasks: task ids must be in [-1, {len(state.tasks) - 1}] for tasks {state.tasks}")
    previous, state.task_ids = state.task_ids, task_ids
    try:
        yield
    finally:
        state.task_ids = previous


def set_default_task(model: nn.Module, name: str | None) -> None:
    """Use task `name` for every token outside route_tasks (None = base model, no adapter)."""
    state = _bottleneck_state(model)
    if name is not None and name not in state.tasks:
        raise ValueError(f"set_default_task: unknown task {name!r}; tasks are {state.tasks}")
    state.default = -1 if name is None else state.tasks.index(name)


def task_index(model: nn.Module, name: str) -> int:
    """Index of a task name, for building task_ids tensors."""
    state = _bottleneck_state(model)
    if name not in state.tasks:
        raise ValueError(f"unknown task {name!r}; tasks are {state.tasks}")
    return state.tasks.index(name)


def _bottleneck_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if ".bottleneck.adapters." in n}


def _saved_weight_names(path: Path) -> set[str]:
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    single = path / "model.safetensors"
    if not single.is_file():
        return set()
    with safe_open(str(single), framework="pt") as f:
        return set(f.keys())


def save_bottleneck_if_present(model: nn.Module, path: Path) -> None:
    """Write adapter weights + config beside a base saved by save_pretrained (no-op without adapters)."""
    info = getattr(model, "_posttrain_bottleneck", None)
    if info is None:
        return None
    from safetensors.torch import save_file

    path = Path(path)
    leaked = [k for k in _saved_weight_names(path) if ".bottleneck." in k]
    if leaked:
        raise RuntimeError(f"save_pretrained wrote bottleneck weights into the base model ({leaked[:3]}...)")
    tensors = {k: v.contiguous().cpu() for k, v in _bottleneck_tensors(model).items()}
    config = {
        "format": "posttrain-bottleneck", "version": 1,
        "tasks": info["tasks"], "bottleneck_size": info["bottleneck_size"], "where": info["where"],
        "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
        "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None,
    }
    atomic_write(path / BOTTLENECK_FILE, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(path / BOTTLENECK_CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2)))


def load_bottleneck_if_present(model: nn.Module, path: Path) -> nn.Module:
    """Attach and load our bottleneck adapters when a model dir carries them."""
    path = Path(path)
    if not (path / BOTTLENECK_FILE).is_file():
        return model
    from safetensors.torch import load_file

    cfg_file = path / BOTTLENECK_CONFIG
    if not cfg_file.is_file():
        raise ValueError(f"{path / BOTTLENECK_FILE} exists but {cfg_file} is missing; cannot rebuild the adapters")
    try:
        meta = json.loads(cfg_file.read_text())
        cfg = AdapterConfig(
            method="bottleneck", tasks=meta["tasks"], bottleneck_size=meta["bottleneck_size"], where=meta["where"],
            trainable_dtype="fp32" if meta.get("dtype") == "float32" else "same",
        )
    except (KeyError, json.JSONDecodeError, pydantic.ValidationError) as exc:
        raise ValueError(f"{cfg_file}: invalid bottleneck config: {exc}") from exc
    _apply_bottleneck(model, cfg)
    if cfg.trainable_dtype == "fp32":
        _cast_trainable(model, torch.float32)
    weights = load_file(str(path / BOTTLENECK_FILE))
    params = dict(model.named_parameters())
    expected = set(_bottleneck_tensors(model))
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(f"{path / BOTTLENECK_FILE}: missing {missing[:3]} unexpected {unexpected[:3]}")
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)
    return model


# ----------------------------------------------------------------------------- merge


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold LoRA/DoRA/IA3 into the base weights and return a plain transformers model.

    Full/freeze models are already plain and come back unchanged.
    """
    if getattr(model, "_posttrain_bottleneck", None) is not None:
        raise ValueError(
            "merge_adapter: bottleneck adapters add a nonlinear module (down -> GELU -> up) per layer and route "
            "per task; that cannot be folded into the base weights. Save the model with its adapters instead."
        )
    if not hasattr(model, "peft_config"):
        return model
    cfg = model.peft_config[model.active_adapter]
    if cfg.is_prompt_learning:
        raise ValueError(
            "merge_adapter: prompt tuning learns virtual input tokens, not a weight change; there is nothing to "
            "fold into plain weights. Keep the PEFT adapter and load it with peft.PeftModel.from_pretrained."
        )
    return model.merge_and_unload()
