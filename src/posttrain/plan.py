"""Pre-flight memory planner: will this run fit, before any weight is loaded?

`plan_stage(cfg, device)` reads only the model's config.json (and safetensors headers for
the exact parameter count), a GGUF file's metadata or the default model's config, and
predicts the peak memory of a stage from its recipe: weights, gradients, optimizer state,
activations (per token per layer, with and without checkpointing), the vocabulary head at
loss positions (in chunks), a reference/teacher/rollout copy, the KV cache of RL rollouts,
and on CPU the load peak (the mapped checkpoint file plus the weights being built).
`start_stage` calls `check_fits` so a run that cannot fit stops before it loads anything.

The activation coefficients were counted with autograd's saved-tensor hooks on the default
model (SmolLM2-135M, Llama architecture) through our objectives and kernels; other
architectures are treated as Llama-like. bench/plan_check.py compares the whole prediction
with measured peak RSS (BENCHMARKS.md). GPU figures are unchecked: no GPU was available.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
HEAD_CHUNK = 2048  # objectives.causal_lm_loss / label_token_logps chunk_size: logits live for this many positions
CPU_RUNTIME = 430 * MiB  # python + torch + transformers + peft + accelerate + posttrain imported (measured, 2 cores)
CUDA_RUNTIME = 600 * MiB  # CUDA context + kernels (typical; unchecked)
CPU_EFFICIENCY = 0.5  # share of the measured matmul rate a training step reaches (assumed; see the bench)
GPU_EFFICIENCY = 0.4  # model-flops utilisation assumed on GPUs (unchecked)
SKIP_ENV = "POSTTRAIN_MEMORY_CHECK"  # "0"/"off": start_stage warns instead of refusing
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PlanError(ValueError):
    """The planner cannot read what it needs (the message says what)."""


# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a decoder-only model, read from its metadata only."""

    source: str  # the file the figures came from
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    params: int  # unique parameters (a tied head counted once)
    disk_bytes: int | None = None  # the weights file(s) a CPU load maps (None: not known)
    exact: bool = False  # params counted from the weights file's header, not from the config
    experts: int = 1  # MoE: experts per layer (all held in memory)
    active_experts: int = 1  # MoE: experts each token runs

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one decoder layer (MLP ones per expert)."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def _first(cfg: dict, *keys: str, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def shape_from_config(cfg: dict, source: str, params: int | None = None, disk_bytes: int | None = None) -> ModelShape:
    """A ModelShape from a HF config.json dict (Llama-style keys, GPT-2 aliases, nested text_config)."""
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], "tie_word_embeddings": cfg.get("tie_word_embeddings",
                                                                    cfg["text_config"].get("tie_word_embeddings"))}
    try:
        hidden = int(_first(cfg, "hidden_size", "n_embd", "d_model"))
        layers = int(_first(cfg, "num_hidden_layers", "n_layer", "num_layers"))
        heads = int(_first(cfg, "num_attention_heads", "n_head"))
        vocab = int(cfg["vocab_size"])
    except (TypeError, KeyError):
        raise PlanError(f"{source}: the planner needs a decoder-only transformer config with hidden_size, "
                        "num_hidden_layers, num_attention_heads and vocab_size") from None
    kv = int(_first(cfg, "num_key_value_heads", default=heads))
    head_dim = int(_first(cfg, "head_dim", default=hidden // heads))
    inter = int(_first(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden))
    experts = int(_first(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=1) or 1)
    active = int(_first(cfg, "num_experts_per_tok", "moe_topk", default=1) or 1) if experts > 1 else 1
    if experts > 1:
        inter = int(_first(cfg, "moe_intermediate_size", default=inter))
    tied = bool(cfg.get("tie_word_embeddings", True))
    shape = ModelShape(source, layers, hidden, heads, kv, head_dim, inter, vocab, tied, 0, disk_bytes,
                       False, experts, min(active, experts))
    if params is None:
        return dataclasses.replace(shape, params=formula_params(shape))
    return dataclasses.replace(shape, params=params, exact=True)


def formula_params(s: ModelShape) -> int:
    """Parameters of a Llama-style model from its shape (RMSNorm weights, no biases)."""
    lin = s.linear_shapes()
    attn = sum(a * b for k, (a, b) in lin.items() if k in ("q_proj", "k_proj", "v_proj", "o_proj"))
    mlp = sum(a * b for k, (a, b) in lin.items() if k in ("gate_proj", "up_proj", "down_proj")) * s.experts
    router = s.hidden * s.experts if s.experts > 1 else 0
    per_layer = attn + mlp + router + 2 * s.hidden
    emb = s.vocab * s.hidden
    return s.layers * per_layer + emb * (1 if s.tied else 2) + s.hidden


def safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file (names -> dtype, shape, offsets): a few KB read."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > 100 * MiB:
            raise PlanError(f"{path}: not a safetensors file (header of {n} bytes)")
        return json.loads(fh.read(n))


def count_safetensors(model_dir: Path) -> tuple[int, int] | None:
    """(parameters, bytes on disk) from the weights files' headers; None without safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    else:
        return None
    params = 0
    for f in files:
        for name, info in safetensors_header(f).items():
            if name != "__metadata__":
                params += math.prod(info["shape"])
    return params, sum(f.stat().st_size for f in files)


def shape_from_dir(model_dir: Path) -> ModelShape:
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    counted = count_safetensors(model_dir)
    if counted is None:
        disk = sum(p.stat().st_size for p in model_dir.glob("*.bin")) or None
        return shape_from_config(cfg, str(cfg_path), disk_bytes=disk)
    return shape_from_config(cfg, str(cfg_path), params=counted[0], disk_bytes=counted[1])


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_metadata(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """(metadata, {tensor name: elements}) of a GGUF file, from its header only (arrays are
    reduced to their length). Our own ~40 lines: gguf.GGUFReader also decodes every token
    string, ~100x slower, and start_stage has ~50 ms."""
    import mmap

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise PlanError(f"{path}: not a GGUF file")
        pos = 8
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, pos)
        pos += 16

        def string() -> str:
            nonlocal pos
            (n,) = struct.unpack_from("<Q", buf, pos)
            pos += 8 + n
            return bytes(buf[pos - n:pos]).decode("utf-8", "replace")

        def value(kind: int):
            nonlocal pos
            if kind == 8:
                return string()
            if kind == 9:
                elem, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if elem in _GGUF_SCALARS:
                    pos += struct.calcsize(_GGUF_SCALARS[elem]) * count
                elif elem == 8:  # strings (the vocabulary): skip by their lengths
                    unpack = struct.Struct("<Q").unpack_from
                    for _ in range(count):
                        pos += 8 + unpack(buf, pos)[0]
                else:
                    for _ in range(count):
                        value(elem)
                return count
            fmt_ = _GGUF_SCALARS.get(kind)
            if fmt_ is None:
                raise PlanError(f"{path}: unknown GGUF value type {kind}")
            (v,) = struct.unpack_from(fmt_, buf, pos)
            pos += struct.calcsize(fmt_)
            return v

        meta = {}
        for _ in range(n_kv):
            key = string()
            (kind,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            meta[key] = value(kind)
        tensors = {}
        for _ in range(n_tensors):
            name = string()
            (dims,) = struct.unpack_from("<I", buf, pos)
            shape = struct.unpack_from(f"<{dims}Q", buf, pos + 4)
            pos += 4 + 8 * dims + 4 + 8  # dims, shape, type, offset
            tensors[name] = math.prod(shape)
    return meta, tensors


def shape_from_gguf(path: Path) -> ModelShape:
    """Shape from GGUF metadata; the planner predicts the dequantized model the loader builds."""
    meta, tensors = gguf_metadata(path)
    arch = meta.get("general.architecture", "llama")
    try:
        heads = int(meta[f"{arch}.attention.head_count"])
        hidden = int(meta[f"{arch}.embedding_length"])
        cfg = {"hidden_size": hidden, "num_hidden_layers": int(meta[f"{arch}.block_count"]),
               "num_attention_heads": heads,
               "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
               "head_dim": int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
               "intermediate_size": int(meta[f"{arch}.feed_forward_length"]),
               "vocab_size": int(meta.get(f"{arch}.vocab_size", meta.get("tokenizer.ggml.tokens", 0))),
               "tie_word_embeddings": "output.weight" not in tensors}
    except KeyError as exc:
        raise PlanError(f"{path}: GGUF metadata lacks {exc}; the planner needs a decoder-only transformer") from None
    params = sum(tensors.values())
    # the loader converts once to an fp32 safetensors copy, which later loads map
    return shape_from_config(cfg, str(path), params=params, disk_bytes=4 * params)


def read_model_shape(spec: str) -> tuple[ModelShape, dict | None]:
    """(shape, adapter_config or None) of a model spec, without loading weights or converting.

    Accepts what `models.load_model` accepts: 'default', a .gguf file, a run dir, a HF dir,
    a PEFT adapter dir (its base is read), a hub id present in the local HF cache.
    """
    from posttrain.models import DEFAULT_CACHE_NAME, _adapter_base, cache_dir, default_gguf_path, is_run_dir

    spec = str(spec)
    if spec == "default":
        converted = cache_dir() / "models" / DEFAULT_CACHE_NAME
        if (converted / "config.json").is_file():
            return shape_from_dir(converted), None
        return shape_from_gguf(default_gguf_path()), None
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PlanError(f"GGUF file not found: {path}")
        stat = path.stat()
        converted = cache_dir() / "models" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
        return (shape_from_dir(converted) if (converted / "config.json").is_file() else shape_from_gguf(path)), None
    if path.is_dir():
        if is_run_dir(path):
            path = path / "final"
        base = _adapter_base(path)
        if base is not None:
            shape, _ = read_model_shape(base)
            return shape, json.loads((path / "adapter_config.json").read_text())
        if not (path / "config.json").is_file():
            raise PlanError(f"{path} has no config.json: not a HF model, adapter or run directory")
        return shape_from_dir(path), None
    if path.exists() or spec.startswith((".", "/", "~")):
        raise PlanError(f"model path does not exist or is not a directory: {spec}")
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(spec, "config.json")
    if not isinstance(found, str):
        raise PlanError(f"{spec}: no such local directory, and no hub model of that id in the local Hugging Face "
                        f"cache (the planner reads no network): give a local model dir, or fetch the config first "
                        f"(huggingface-cli download {spec} config.json)")
    return shape_from_dir(Path(found).parent), None


# ----------------------------------------------------------------------------- the device


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" or "cuda"
    total: int  # bytes
    available: int  # bytes the run may use now
    label: str
    peak_flops: dict[str, float] = field(default_factory=dict)  # "bf16"/"fp32" -> FLOP/s; empty: unknown
    measured: bool = False  # memory figures read from this machine (not stated)
    flops_measured: bool = False  # peak_flops measured here (measure_cpu_flops), not stated
    fast_bf16: bool = True


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0]) * 1024
    return out


def _cgroup_room() -> int | None:
    """Bytes left under a cgroup v2 memory limit (containers), None when unlimited or unknown."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) - used


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(g|gb|gib|m|mb|mib|t|tb|tib)$", re.I)


def parse_size(text: str) -> int:
    """'80GB', '24GiB', '512MB' -> bytes (GB and GiB both mean 2**30: GPU memory is sold in GiB)."""
    m = _SIZE.match(text.strip())
    if not m:
        raise PlanError(f"memory size {text!r}: write it like 80GB, 24GiB or 512MB")
    unit = m.group(2).lower()[0]
    return int(float(m.group(1)) * {"m": MiB, "g": GiB, "t": 1 << 40}[unit])


def get_device(spec: str | None = None, peak_tflops: float | None = None) -> Device:
    """'cpu' (this machine's MemAvailable), 'cuda' (device 0's free memory), or a stated size:
    'cpu:16GB', 'cuda:80GB'. None: cuda when torch sees one, else cpu."""
    spec = (spec or "").strip().lower()
    if not spec:
        import torch

        spec = "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, size = spec.partition(":")
    if kind not in ("cpu", "cuda"):
        raise PlanError(f"--device {spec!r}: use cpu, cuda, cpu:SIZE or cuda:SIZE (e.g. cuda:80GB)")
    flops = {"bf16": peak_tflops * 1e12, "fp32": peak_tflops * 1e12} if peak_tflops else {}
    if size and not re.fullmatch(r"\d+", size):
        total = parse_size(size)
        return Device(kind, total, total, f"{kind} with {total / GiB:.0f} GiB (stated)", flops,
                      fast_bf16=kind == "cuda" or cpu_has_fast_bf16())
    if kind == "cpu":
        info = _meminfo()
        room = _cgroup_room()
        available = min(info["MemAvailable"], room) if room is not None else info["MemAvailable"]
        return Device("cpu", info["MemTotal"], available, f"cpu ({os.cpu_count()} cores, "
                      f"{info['MemTotal'] / GiB:.1f} GiB RAM)", flops, measured=True, fast_bf16=cpu_has_fast_bf16())
    import torch

    if not torch.cuda.is_available():
        raise PlanError("--device cuda: torch sees no CUDA device here; state its memory instead, e.g. cuda:80GB")
    index = int(size) if size else 0
    free, total = torch.cuda.mem_get_info(index)
    return Device("cuda", total, free, f"{torch.cuda.get_device_name(index)} ({total / GiB:.0f} GiB)", flops,
                  measured=True, fast_bf16=torch.cuda.is_bf16_supported())


def measure_cpu_flops(rounds: int = 3, seconds: float = 0.1) -> dict[str, float]:
    """Matmul FLOP/s of this CPU in bf16 and fp32: the best of `rounds` short runs of 1024^3
    products (~0.6 s in all; the best, since a shared CPU only ever slows a run down)."""
    import time

    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(1024, 1024, dtype=dtype)
        b = torch.randn(1024, 1024, dtype=dtype)
        a @ b
        best = 0.0
        for _ in range(rounds):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                a @ b
                n += 1
            best = max(best, 2 * 1024**3 * n / (time.perf_counter() - start))
        out[name] = best
    return out


# ----------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Setup:
    """The knobs of a run that move memory, read from a stage config (and changed by suggestions)."""

    stage: str
    method: str = "lora"  # full, freeze, lora, dora, ia3, prompt, bottleneck, none (forward only)
    lora_r: int = 16
    lora_targets: tuple[str, ...] = LORA_MODULES
    frozen_fraction: float = 0.0  # freeze: share of parameters frozen (estimated from freeze_layers)
    virtual_tokens: int = 0
    bottleneck: int = 0  # size x tasks x sites handled in trainable_params
    bottleneck_sites: int = 0
    load_dtype: str = "bf16"  # the dtype cfg.model.dtype resolves to
    trainable_fp32: bool = True  # adapter.trainable_dtype == fp32
    rows: int = 1  # sequences per micro-batch
    seq: int = 2048  # tokens per sequence (packing: one row of `seq` tokens)
    loss_tokens: int | None = None  # positions that carry loss per micro-batch (None: every position)
    packed: bool = True
    max_length: int = 0  # data.max_length (a packed row holds one example up to this long)
    checkpointing: bool = False
    mixed_precision: str = "no"  # train.mixed_precision: "bf16"/"fp16" autocast the matmuls of fp32 weights
    short_attention_cols: int = 0  # packed rows of examples <= 256 tokens: probability columns per token (0: none)
    fixed_mmap_threshold: bool = False  # MALLOC_MMAP_THRESHOLD_ set: glibc returns freed activations (see estimate)
    optimizer: str = "adamw"  # adamw | adamw8bit (a what-if: posttrain has no 8-bit optimizer)
    shards: int = 1  # FSDP processes the weights, gradients and optimizer are split over
    extra_copies: tuple[tuple[str, int], ...] = ()  # (name, bytes): reference/teacher/rollout/critic weights
    kv_cache: int = 0  # bytes of the rollout KV cache
    forward_only: bool = False  # stages that do not train (quantize without QAT, prune without recovery)

    @property
    def tokens(self) -> int:
        return self.rows * self.seq

    @property
    def loss_positions(self) -> int:
        return self.tokens if self.loss_tokens is None else min(self.loss_tokens, self.tokens)

    @property
    def compute_dtype(self) -> str:
        if self.method in ("full", "freeze") and self.trainable_fp32:
            return "fp32"  # apply_adapter casts the whole model to fp32 (mixed bf16/fp32 blocks do not run)
        return self.load_dtype

    @property
    def activation_dtype(self) -> str:
        """The dtype matmul outputs (most saved activations) have: autocast's over fp32 weights."""
        if self.compute_dtype == "fp32" and self.mixed_precision in ("bf16", "fp16"):
            return self.mixed_precision
        return self.compute_dtype


def _get(obj: Any, dotted: str, default=None):
    for part in dotted.split("."):
        obj = getattr(obj, part, None) if obj is not None else None
    return default if obj is None else obj


def resolve_load_dtype(dtype: str, device: Device) -> str:
    if dtype in (None, "auto"):
        return "bf16" if device.fast_bf16 else "fp32"
    return dtype


def setup_of(cfg: Any, shape: ModelShape, device: Device, extra_shapes: dict[str, tuple[ModelShape, str]]) -> Setup:
    """The Setup a stage config describes (fields read by name: the planner sits below the stages)."""
    stage = str(_get(cfg, "stage", "sft")).replace("-", "_")
    adapter = _get(cfg, "adapter")
    train = _get(cfg, "train")
    data = _get(cfg, "data")
    if stage == "quantize" and _get(cfg, "qat") is None:
        train = None  # post-training quantization: no training (its train section is QAT's)
    if stage == "prune":  # trains only in its recovery section
        recovery = _get(cfg, "recovery")
        adapter, train, data = (_get(recovery, "adapter"), _get(recovery, "train"), _get(recovery, "data"))
    method = _get(adapter, "method", "full") if adapter is not None else ("full" if train is not None else "none")
    load_dtype = resolve_load_dtype(_get(cfg, "model.dtype", "auto"), device)
    extra = []
    if stage == "quantize" and train is not None:
        load_dtype = "fp32"  # QAT loads the model in fp32 (run_quantize)
        if _get(cfg, "qat.objective", "distill") == "distill":
            extra.append(("teacher (frozen bf16 copy)", shape.params * 2))
    max_length = int(_get(data, "max_length", 0) or _get(data, "max_prompt_length", 0) or 512)
    kw: dict[str, Any] = {}
    if train is not None:
        packing = bool(_get(train, "packing", False))
        batch = int(_get(train, "batch_size", 1))
        if stage in ("ppo", "grpo", "rloo", "online_dpo"):
            new = int(_get(cfg, "rollout.max_new_tokens", 0) or _get(cfg, "sampling.max_new_tokens", 0) or 64)
            max_length = int(_get(data, "max_prompt_length", 256)) + new
        if stage in ("ppo", "grpo", "rloo"):
            # updates pack each minibatch's (prompt, response) rows into micro-batches of train.max_tokens;
            # loss only on the response tokens
            seqs = int(_get(cfg, "rollout.prompts_per_step", 8)) * int(_get(cfg, "rollout.samples_per_prompt", 4))
            seq = min(int(_get(train, "max_tokens", 4096)), seqs * max_length)
            kw.update(rows=1, seq=seq, packed=True, loss_tokens=seq * new // max_length)
        elif packing:
            rows, seq = 1, max(int(_get(train, "max_tokens", 2048)), max_length)
        else:
            rows, seq = batch * (2 if stage in ("dpo", "rm") else 1), max_length  # a pair: two rows
        if "rows" not in kw:
            kw.update(rows=rows, seq=seq, packed=packing, max_length=max_length)
        kw["checkpointing"] = bool(_get(train, "gradient_checkpointing", False))
        kw["mixed_precision"] = str(_get(train, "mixed_precision", "no") or "no")
        if packing and stage == "sft":
            kw["short_attention_cols"] = short_attention_cols(cfg)
    else:
        kw["forward_only"] = True
        kw.update(rows=1, seq=max_length)
    if adapter is not None:
        targets = _get(adapter, "target_modules", "all-linear")
        kw.update(lora_r=int(_get(adapter, "r", 16)), trainable_fp32=_get(adapter, "trainable_dtype", "fp32") == "fp32",
                  lora_targets=LORA_MODULES if targets == "all-linear" else tuple(
                      m for m in LORA_MODULES if any(m == t or m.endswith(t) for t in targets)),
                  virtual_tokens=int(_get(adapter, "num_virtual_tokens", 0)) if method == "prompt" else 0)
        if method == "bottleneck":
            kw.update(bottleneck=int(_get(adapter, "bottleneck_size", 64)) * len(_get(adapter, "tasks", [])),
                      bottleneck_sites=len(_get(adapter, "where", ["attn", "mlp"])))
        if method == "freeze":
            k = int(_get(adapter, "freeze_layers", 0))
            per_layer = (shape.params - shape.vocab * shape.hidden) / max(shape.layers, 1)
            emb = shape.vocab * shape.hidden if _get(adapter, "freeze_embeddings", False) else 0
            kw["frozen_fraction"] = min(1.0, (k * per_layer + emb) / shape.params)
    weights_of = lambda s, dt: s.params * DTYPE_BYTES[resolve_load_dtype(dt, device)]  # noqa: E731
    copies = [(name, weights_of(s, dt)) for name, (s, dt) in extra_shapes.items()] + extra
    peft = method in ("lora", "dora", "ia3", "prompt")
    if stage == "dpo":
        ref = str(_get(cfg, "dpo.reference", "auto"))
        if _get(cfg, "dpo.reference_model") is None and ref == "copy":
            copies.append(("reference (copy)", weights_of(shape, load_dtype)))
    if stage in ("ppo", "grpo", "rloo"):
        prompts = int(_get(cfg, "rollout.prompts_per_step", 8)) * int(_get(cfg, "rollout.samples_per_prompt", 4))
        if method in ("lora", "dora"):
            copies.append(("rollout copy (LoRA folded)", weights_of(shape, load_dtype)))
        elif not peft:
            copies.append(("reference (frozen copy)", weights_of(shape, load_dtype)))
        if stage == "ppo":
            copies.append(("critic (weights, head)", weights_of(shape, load_dtype)))
        kw["kv_cache"] = kv_cache_bytes(shape, prompts, max_length, DTYPE_BYTES[load_dtype])
    if stage == "online_dpo":
        prompts = int(_get(cfg, "sampling.prompts_per_step", 8)) * int(_get(cfg, "sampling.samples_per_prompt", 4))
        kw["kv_cache"] = kv_cache_bytes(shape, prompts, max_length, DTYPE_BYTES[load_dtype])
    kw["fixed_mmap_threshold"] = bool(os.environ.get("MALLOC_MMAP_THRESHOLD_"))
    return Setup(stage=stage, method=method, load_dtype=load_dtype, extra_copies=tuple(copies), **kw)


SHORT_ATTENTION = 256  # kernels.attention.SHORT: longest example that takes the short (probabilities-kept) path
SAMPLE_RECORDS = 256


def short_attention_cols(cfg: Any) -> int:
    """Probability columns per token the short attention path keeps for this data's packed rows.

    A row of E examples padded to its longest, M, keeps E x M x M probabilities per head; the
    sampled examples are packed into rows as the loop packs them to count it. Read from the first records of a local JSONL training
    file (tokenizer only, no weights); 0 when most examples are longer than SHORT_ATTENTION (flash
    attention keeps no probabilities) or the file cannot be sampled here.
    """
    path = Path(str(_get(cfg, "data.train", "")))
    if path.suffix != ".jsonl" or not path.is_file():
        return 0
    return _sampled_cols(path, path.stat().st_mtime_ns, str(_get(cfg, "model.name", "default")),
                         _get(cfg, "data.kind"), int(_get(cfg, "data.max_length", 1024)),
                         int(_get(cfg, "train.max_tokens", 2048)))


@functools.lru_cache(maxsize=16)
def _sampled_cols(path: Path, mtime_ns: int, model: str, kind: str | None, max_length: int, row_tokens: int) -> int:
    """short_attention_cols' sampling, once per file version (stages check at every start)."""
    from posttrain.data.templates import encode_record
    from posttrain.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(model)
    except (OSError, ValueError):  # no tokenizer here (a bare weights dir): the stage itself will say so
        return 0
    lengths = []
    with open(path, encoding="utf-8") as fh:
        for line, _ in zip(fh, range(SAMPLE_RECORDS)):
            try:  # the loader reports bad records with their line; an estimate skips them
                record = json.loads(line)
                example = encode_record(tokenizer, record, kind or (
                    "chat" if "messages" in record else "completion" if "prompt" in record else "text"), max_length)
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            if example is not None:
                lengths.append(len(example["input_ids"]))
    short = [n for n in lengths if n <= SHORT_ATTENTION]
    if len(short) < 0.9 * max(len(lengths), 1) or not short:
        return 0
    # pack the sample in order into rows of `row_tokens`, as the loop does: sum of E x M² over rows / tokens
    cols = tokens = 0
    row: list[int] = []
    for n in short + [row_tokens + 1]:  # the sentinel closes the last row
        if row and sum(row) + n > row_tokens:
            cols, tokens, row = cols + len(row) * max(row) ** 2, tokens + sum(row), []
        row.append(n)
    return int(cols / tokens)


def kv_cache_bytes(shape: ModelShape, sequences: int, length: int, dtype_bytes: int) -> int:
    """K and V of every layer for `sequences` x `length` tokens."""
    return 2 * shape.layers * shape.kv_dim * sequences * length * dtype_bytes


def trainable_params(shape: ModelShape, s: Setup) -> int:
    if s.method == "full":
        return shape.params
    if s.method == "freeze":
        return int(shape.params * (1 - s.frozen_fraction))
    lin = shape.linear_shapes()
    if s.method in ("lora", "dora"):
        per_layer = sum(s.lora_r * (a + b) * (shape.experts if k in ("gate_proj", "up_proj", "down_proj") else 1)
                        for k, (a, b) in lin.items() if k in s.lora_targets)
        if s.method == "dora":
            per_layer += sum(b for k, (_, b) in lin.items() if k in s.lora_targets)
        return shape.layers * per_layer
    if s.method == "ia3":
        return shape.layers * (2 * shape.kv_dim + shape.intermediate)
    if s.method == "prompt":
        return s.virtual_tokens * shape.hidden
    if s.method == "bottleneck":
        return shape.layers * s.bottleneck_sites * (2 * shape.hidden + 1) * s.bottleneck
    return 0


def layer_activation_bytes(shape: ModelShape, s: Setup) -> float:
    """Bytes autograd keeps per token per decoder layer (no checkpointing).

    Counted with saved-tensor hooks on SmolLM2-135M through causal_lm_loss (fused RMSNorm and
    rotary, flash SDPA, fused LoRA): full training keeps about 8h + 2kv + 4i values per token
    (norm inputs and outputs, q/k/v/out of attention, the MLP's gate, up, act and product);
    a frozen base with LoRA about 6.5h + 2kv + 4i in the base dtype plus the LoRA inputs
    and r-wide intermediates in fp32.
    """
    h, kv, i = shape.hidden, shape.kv_dim, shape.intermediate * shape.active_experts
    b = DTYPE_BYTES[s.activation_dtype]
    # under autocast the residual stream stays fp32: the two norm inputs keep 2 more bytes a value
    residual = 2 * 2 * h if s.activation_dtype != s.compute_dtype else 0
    lse = 4 * shape.heads  # flash attention's log-sum-exp, fp32
    if s.short_attention_cols and b < 4:
        # kernels.attention's short path (examples <= 256 tokens, bf16/fp16): fp32 probabilities of each
        # example's [M, M] block and fp32 copies of q, k, v and the output
        lse = 4 * (shape.heads * s.short_attention_cols + 2 * shape.q_dim + 2 * kv)
    if s.method in ("full", "freeze"):
        return b * (8 * h + 2 * kv + 4 * i) + residual + lse
    if s.method in ("lora", "dora"):
        lora = 4 * s.lora_r * len(s.lora_targets) * 2
        return b * (6.5 * h + 2 * kv + 4 * i) + residual + lse + lora
    return b * (6.5 * h + 2 * kv + 4 * i) + residual + lse  # ia3, prompt, bottleneck: a frozen base keeps as much


def head_peak_bytes(shape: ModelShape, s: Setup) -> int:
    """The vocabulary head at loss positions: logits for at most HEAD_CHUNK positions at a time.

    Per position and vocabulary entry: logits in the compute dtype, their fp32 copy, the
    fp32 log-softmax kept for backward, and in backward its gradient and the logits' gradient.
    """
    n = min(s.loss_positions, HEAD_CHUNK)
    b = DTYPE_BYTES[s.activation_dtype]
    per = (b if b != 4 else 0) + 4 + 4 + 4 + b
    if s.loss_positions > HEAD_CHUNK:
        # chunks run under checkpointing: one chunk at a time in backward, and its low-precision logits are
        # not kept (measured: 135M LoRA, 8192-token rows, ~11 B per position and entry against 16 unchunked)
        per = 4 + 4 + 4
    return int(n * shape.vocab * per)


def forward_flops(shape: ModelShape, s: Setup) -> float:
    """Matmul FLOPs of one forward over a micro-batch (head at loss positions only)."""
    lin = shape.linear_shapes()
    per_token = 2 * sum(a * b * (shape.active_experts if k in ("gate_proj", "up_proj", "down_proj") else 1)
                        for k, (a, b) in lin.items())
    attn = 2 * 2 * (s.seq / 2) * shape.q_dim  # QK^T and AV over half the (causal) context on average
    loss = s.loss_positions
    return shape.layers * (per_token + attn) * s.tokens + 2 * shape.hidden * shape.vocab * loss


@dataclass
class Part:
    name: str
    bytes: int
    note: str = ""


@dataclass
class Plan:
    """A prediction: the parts of the peak, the peak, and how it compares with the device."""

    setup: Setup
    shape: ModelShape
    device: Device
    parts: list[Part]
    peak: int
    load_peak: int
    train_peak: int
    checkpointed_activations: int
    step_flops: float
    step_seconds: float | None
    suggestions: list[tuple[str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.peak <= self.device.available

    def to_dict(self) -> dict:
        return {"peak_bytes": self.peak, "load_peak_bytes": self.load_peak, "train_peak_bytes": self.train_peak,
                "device": self.device.label, "available_bytes": self.device.available, "fits": self.fits,
                "parts": {p.name: p.bytes for p in self.parts}, "step_flops": self.step_flops,
                "step_seconds": self.step_seconds, "suggestions": [{"change": c, "peak_bytes": b}
                                                                   for c, b in self.suggestions]}


def estimate(shape: ModelShape, s: Setup, device: Device, runtime: int | None = None) -> Plan:
    """Peak memory of one process of the run (FSDP: per GPU) and a step-time estimate."""
    wb = DTYPE_BYTES[s.compute_dtype if s.method in ("full", "freeze") else s.load_dtype]
    trainable = 0 if s.forward_only else trainable_params(shape, s)
    tb = 4 if s.trainable_fp32 else DTYPE_BYTES[s.load_dtype]
    if s.method in ("full", "freeze"):
        weights = shape.params * wb
    else:
        weights = shape.params * wb + trainable * tb
    grads = trainable * tb
    opt_per = 2 if s.optimizer == "adamw8bit" else 2 * tb
    optimizer = trainable * opt_per
    if s.shards > 1:
        weights, grads, optimizer = weights // s.shards, grads // s.shards, optimizer // s.shards
    per_layer = layer_activation_bytes(shape, s)
    full_acts = int(per_layer * shape.layers * s.tokens)
    # checkpointing keeps each layer's input (h values) and recomputes one layer at a time in backward
    ckpt_acts = int(DTYPE_BYTES[s.compute_dtype] * shape.hidden * shape.layers * s.tokens + per_layer * s.tokens)
    # CPU + checkpointing over a frozen base: glibc's dynamic mmap threshold keeps the activations each
    # recomputed layer frees in its heap (measured: 135M LoRA 2x2048 peaked at 5.1 GB against 2.5 predicted,
    # above the un-checkpointed run); a fixed threshold (MALLOC_MMAP_THRESHOLD_=131072) returns them. Without
    # it, the un-checkpointed figure is the bound we can state.
    heap_keeps = (device.kind == "cpu" and s.checkpointing and s.method not in ("full", "freeze")
                  and not s.fixed_mmap_threshold)
    acts = 0 if s.forward_only else (ckpt_acts if s.checkpointing and not heap_keeps else full_acts)
    head = head_peak_bytes(shape, s) if not s.forward_only else int(min(s.tokens, HEAD_CHUNK) * shape.vocab * 4)
    head_grad = shape.vocab * shape.hidden * tb if s.method in ("full", "freeze") and not s.forward_only else 0
    # the peak in backward: every activation still held plus the head's buffers and the first
    # (head) gradient; or at its end, every gradient; the optimizer state lives through both
    # autocast casts each fp32 weight once per forward and keeps the copy (cache, then saved for backward)
    cast_copies = 0 if s.forward_only or s.activation_dtype == s.compute_dtype else shape.params * DTYPE_BYTES[s.activation_dtype]
    active = acts + head + head_grad + cast_copies
    # CPU: full/freeze training casts the loaded weights to fp32 tensor by tensor; glibc keeps most of the
    # freed copy in its heap (measured on the default model: 205 of the 269 MB came back only with
    # malloc_trim), so it stays resident through training
    cast_leftover = 0
    if (device.kind == "cpu" and s.method in ("full", "freeze") and s.compute_dtype != s.load_dtype
            and not s.fixed_mmap_threshold):  # a fixed threshold maps each tensor: freeing returns it
        cast_leftover = shape.params * DTYPE_BYTES[s.load_dtype]
    steady = (weights + optimizer + max(active, grads) + cast_leftover + sum(b for _, b in s.extra_copies)
              + s.kv_cache)
    runtime = (CPU_RUNTIME if device.kind == "cpu" else CUDA_RUNTIME) if runtime is None else runtime
    # CPU: loading maps the checkpoint file (its pages count as resident) while the weights are built
    disk = shape.disk_bytes or shape.params * 4
    load = disk + shape.params * DTYPE_BYTES[s.load_dtype] if device.kind == "cpu" else 0
    parts = [Part("runtime", runtime, "python, torch, libraries" + ("" if device.kind == "cpu" else "; CUDA context"))]
    parts.append(Part("weights", weights, f"{count(shape.params)} params in {s.compute_dtype if s.method in ('full', 'freeze') else s.load_dtype}"
                      + (f" + {count(trainable)} {s.method} params" if s.method not in ("full", "freeze", "none") else "")
                      + (f", 1/{s.shards} (FSDP)" if s.shards > 1 else "")))
    if not s.forward_only:
        parts.append(Part("gradients", grads, f"{count(trainable)} trainable x {tb} B"))
        parts.append(Part("optimizer", optimizer, "AdamW 8-bit moments" if s.optimizer == "adamw8bit"
                          else f"AdamW: 2 moments x {tb} B per trainable param"))
        parts.append(Part("activations", acts, f"{s.rows} x {s.seq} tokens x {shape.layers} layers x "
                          f"{per_layer / 1024:.1f} KiB" + (
                              " (checkpointed, but the C heap keeps what it frees: set MALLOC_MMAP_THRESHOLD_=131072)"
                              if heap_keeps else " (checkpointed)" if s.checkpointing
                              else f"; checkpointed: {fmt(ckpt_acts)}")))
    if cast_copies:
        parts.append(Part("autocast weight copies", cast_copies, f"{s.mixed_precision} copies of the fp32 weights, "
                          "live from the forward through the backward"))
    n_loss = min(s.loss_positions, HEAD_CHUNK)
    parts.append(Part("head (logits)", head + head_grad, f"{n_loss} loss positions x {shape.vocab} vocab"
                      + (" (one chunk)" if s.loss_positions > HEAD_CHUNK else "")))
    if cast_leftover:
        parts.append(Part("freed load copy", cast_leftover, f"the {s.load_dtype} weights cast to fp32: freed, "
                          "but kept in the C heap (model.dtype=fp32 avoids it)"))
    for name, b in s.extra_copies:
        parts.append(Part(name, b, "frozen, forward only"))
    if s.kv_cache:
        parts.append(Part("rollout KV cache", s.kv_cache, "prompts x samples x (prompt + new tokens)"))
    if load:
        parts.append(Part("load peak (transient)", load, "mapped checkpoint file + weights being built; "
                          "counted only if above the training peak"))
    train_peak = runtime + steady
    peak = runtime + max(steady, load)
    fwd = forward_flops(shape, s)
    if s.forward_only:
        flops = fwd
    else:
        backward = 2 * fwd if s.method in ("full", "freeze") else fwd  # frozen base: input grads only
        flops = fwd + backward + (fwd if s.checkpointing else 0)
    rate = device.peak_flops.get(s.activation_dtype)
    eff = CPU_EFFICIENCY if device.kind == "cpu" else GPU_EFFICIENCY
    seconds = flops / (rate * eff) if rate else None
    return Plan(s, shape, device, parts, peak, load, train_peak, ckpt_acts, flops, seconds)


def count(n: int) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{n:,}"


def fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.0f} MiB"


# ----------------------------------------------------------------------------- suggestions


def suggest(plan: Plan, runtime: int | None = None) -> list[tuple[str, int]]:
    """Changes that lower the peak, each with the peak it predicts (best first); the ones that fit
    the device come first. Each names the recipe key to set, or says that posttrain lacks it."""
    s, shape, dev = plan.setup, plan.shape, plan.device
    out: list[tuple[str, Setup]] = []
    if s.forward_only:
        return []
    if s.method in ("full", "freeze"):
        out.append(("adapter.method=lora (r=16, frozen base in bf16)",
                    dataclasses.replace(s, method="lora", load_dtype="bf16" if dev.fast_bf16 else s.load_dtype)))
        if dev.kind == "cpu" and s.trainable_fp32 and s.load_dtype != "fp32":
            out.append(("model.dtype=fp32 (load straight in fp32: no freed bf16 copy left in the heap)",
                        dataclasses.replace(s, load_dtype="fp32")))
        if s.trainable_fp32 and dev.fast_bf16:
            out.append(("adapter.trainable_dtype=same model.dtype=bf16 (pure bf16 training)",
                        dataclasses.replace(s, trainable_fp32=False, load_dtype="bf16")))
    if s.packed and s.seq > 512:
        n = s.seq // 2
        out.append((f"train.max_tokens={n}" + (f" data.max_length={n}" if s.max_length > n else "")
                    + " (tokens per packed micro-batch; raise train.grad_accum to keep the step size)",
                    dataclasses.replace(s, seq=n)))
    if not s.packed and s.rows > 1:
        out.append((f"train.batch_size={max(1, s.rows // 2)} with train.grad_accum x2 (same step size)",
                    dataclasses.replace(s, rows=max(1, s.rows // 2))))
    if not s.packed and s.seq > 256:
        out.append((f"data.max_length={s.seq // 2}", dataclasses.replace(s, seq=s.seq // 2)))
    if not s.checkpointing:
        rl = s.stage in ("ppo", "grpo", "rloo", "online_dpo")
        cpu_heap = dev.kind == "cpu" and s.method not in ("full", "freeze") and not s.fixed_mmap_threshold
        out.append(("activation checkpointing (not supported by this stage yet: what-if)" if rl
                    else "train.gradient_checkpointing=true (~1/3 more compute)"
                    + (" with MALLOC_MMAP_THRESHOLD_=131072 in the environment" if cpu_heap else ""),
                    dataclasses.replace(s, checkpointing=True, fixed_mmap_threshold=True)))
    if s.optimizer != "adamw8bit" and trainable_params(shape, s) > 50e6:
        out.append(("8-bit AdamW (not a posttrain option yet: what-if)", dataclasses.replace(s, optimizer="adamw8bit")))
    if s.method in ("full", "freeze") and dev.kind == "cuda":
        for n in (2, 4, 8):
            out.append((f"FSDP over {n} GPUs (accelerate launch --use_fsdp --num_processes {n}; per GPU)",
                        dataclasses.replace(s, shards=n)))
    scored = [(text, estimate(shape, alt, dev, runtime).peak) for text, alt in out]
    scored = [(t, p) for t, p in scored if p < plan.peak]
    return sorted(scored, key=lambda tp: tp[1])


# ----------------------------------------------------------------------------- entry points


def _extra_models(cfg: Any) -> dict[str, tuple[ModelShape, str]]:
    """Other models a stage holds: a DPO reference model, a distillation teacher."""
    out = {}
    ref = _get(cfg, "dpo.reference_model")
    if ref:
        out["reference model"] = (read_model_shape(ref)[0], _get(cfg, "model.dtype", "auto"))
    teacher = _get(cfg, "teacher.name")
    if teacher:
        out["teacher"] = (read_model_shape(teacher)[0], _get(cfg, "teacher.dtype", "bf16"))
    return out


def plan_stage(cfg: Any, device: Device | None = None, runtime: int | None = None, with_suggestions: bool = True,
               **setup_changes: Any) -> Plan:
    """The plan of a validated stage config on `device` (default: this machine)."""
    device = device or get_device()
    shape, _ = read_model_shape(_get(cfg, "model.name", "default"))
    setup = setup_of(cfg, shape, device, _extra_models(cfg))
    if setup_changes:
        setup = dataclasses.replace(setup, **setup_changes)
    plan = estimate(shape, setup, device, runtime)
    if setup.loss_tokens is None and not setup.forward_only:
        plan.notes.append("head: assumes every position carries loss (an upper bound for chat data)")
    if device.kind == "cuda":
        plan.notes.append("unchecked on GPU: the figures are the CPU-validated model applied to CUDA "
                          "(allocator caching and fragmentation not modelled)")
    if not shape.exact:
        plan.notes.append(f"parameters from the config formula ({shape.source}); no safetensors header read")
    if with_suggestions:
        plan.suggestions = suggest(plan, runtime)
    return plan


def format_plan(plan: Plan, stage_label: str | None = None) -> str:
    s, shape, dev = plan.setup, plan.shape, plan.device
    head = (f"plan: {stage_label or s.stage} of {Path(shape.source).parent.name or shape.source} "
            f"({count(shape.params)} params, {shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab}); "
            f"method {s.method}, compute {s.compute_dtype}"
            f"{f' ({s.activation_dtype} autocast)' if s.activation_dtype != s.compute_dtype else ''}, "
            f"micro-batch {s.rows} x {s.seq} tokens"
            f"{' (packed)' if s.packed and not s.forward_only else ''}")
    width = max(len(p.name) for p in plan.parts)
    lines = [head, f"  {'part':<{width}}  {'memory':>10}  note"]
    for p in plan.parts:
        lines.append(f"  {p.name:<{width}}  {fmt(p.bytes):>10}  {p.note}")
    lines.append(f"  {'peak':<{width}}  {fmt(plan.peak):>10}  "
                 + ("load peak (mapped file) above the training peak" if plan.load_peak > plan.train_peak - plan.parts[0].bytes
                    else "runtime + training peak"))
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"device: {dev.label}: {fmt(dev.available)} available -> {verdict}"
                 + (f" ({100 * plan.peak / dev.available:.0f}% of it)" if dev.available else ""))
    if plan.step_seconds is not None:
        lines.append(f"step time: ~{plan.step_seconds:.2f} s per micro-batch ({plan.step_flops / 1e12:.2f} TFLOP at "
                     f"{CPU_EFFICIENCY if dev.kind == 'cpu' else GPU_EFFICIENCY:.0%} of "
                     f"{dev.peak_flops[s.activation_dtype] / 1e12:.2f} TFLOP/s {s.activation_dtype}"
                     f"{' measured' if dev.flops_measured else ' stated'})"
                     + ("" if dev.kind == "cpu" else "; unchecked on GPU"))
    else:
        lines.append(f"step time: {plan.step_flops / 1e12:.2f} TFLOP per micro-batch (give --peak-tflops for seconds)")
    if plan.suggestions and not plan.fits:
        lines.append("to make it fit, change one of (predicted peak of each alone):")
        for text, peak in plan.suggestions[:6]:
            ok = "fits" if peak <= dev.available else "still too big"
            lines.append(f"  - {text}: peak {fmt(peak)} ({ok})")
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _process_rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(cfg: Any, device: Device | None = None) -> Plan | None:
    """Refuse (ValueError) a stage that cannot fit the device's available memory, with the reason
    and the suggestions. POSTTRAIN_MEMORY_CHECK=0 (or `--no-memory-check`) turns the refusal into a
    warning. A model the planner cannot read skips the check with a printed note."""
    try:
        device = device or get_device()
        # what this process already holds is in use, not available: count it as the runtime part
        runtime = _process_rss() if device.kind == "cpu" and device.measured else None
        plan = plan_stage(cfg, device, runtime=runtime, with_suggestions=False)
    except (PlanError, OSError, KeyError, ValueError, ImportError) as exc:
        print(f"memory check skipped: {exc}")
        return None
    # on this machine MemAvailable excludes what this process already holds (the runtime part)
    held = runtime if runtime is not None else 0
    if plan.peak - held <= device.available:
        return plan
    plan.suggestions = suggest(plan, runtime)
    message = (f"this run needs about {fmt(plan.peak - held)} more at its peak (predicted peak {fmt(plan.peak)}) "
               f"but {device.label} has {fmt(device.available)} available:\n{format_plan(plan)}\n(override: --no-memory-check or {SKIP_ENV}=0 runs it anyway)")
    if os.environ.get(SKIP_ENV, "").lower() in ("0", "off", "false", "no"):
        print(f"warning ({SKIP_ENV}={os.environ[SKIP_ENV]}): {message}")
        return plan
    raise ValueError(message)
