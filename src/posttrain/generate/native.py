"""The native CPU decoder: Llama-family forward passes in one C call (native.c).

PyTorch's CPU path spends a decode step on dispatch and on a bf16 matrix-vector
product that streams weights at a third of the memory bandwidth. `NativeLM` packs
the model's weights once into a streaming layout (a copy, rebuilt when the weights
change, e.g. between RL steps) and runs prefill, decode and draft verification
through one function whose per-row results do not depend on the rows beside them.
Plain LoRA adapters (PEFT) are folded into that packed copy (W + scale·B·A, rounded
once to the base dtype, as a merge would), so a LoRA model under training decodes as
fast as its base and is itself left untouched: still trainable, same weights.
On CPUs with AMX (and bf16 weights) every matmul runs on AMX tiles: prefill ~5x faster on
2 cores, decode as fast at batch 1 and 4x faster at 100 rows.

The C file is compiled on first use with the system C compiler into the posttrain
cache (one .so per source/flags/compiler; atomic publish). Where that is not
possible (no compiler, no AVX-512, an unsupported architecture, adapters that do
not fold into the weights, a GPU model) `unsupported_reason` says why and the engine uses the PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.models import base_model

SOURCE = Path(__file__).with_name("native.c")
CFLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
          "-mavx512bf16", "-mfma"]
MODEL_TYPES = ("llama", "mistral", "qwen2")
_PACKED: "weakref.WeakKeyDictionary[torch.nn.Module, NativeLM]" = weakref.WeakKeyDictionary()


class NativeError(RuntimeError):
    """The native decoder was required but cannot run here; the message says why."""


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """Compile native.c once per source/flags/compiler and load it."""
    from posttrain.fileio import atomic_write
    from posttrain.models import cache_dir

    cc = compiler()
    if cc is None:
        raise NativeError("no C compiler found (set CC or install gcc)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode() + version.encode()).hexdigest()[:16]
    out = cache_dir() / "native" / f"native-{key}.so"
    if not out.exists():
        def build(tmp: str) -> None:
            proc = subprocess.run([cc, *CFLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise NativeError(f"compiling {SOURCE.name} failed:\n{proc.stderr[-2000:]}")

        atomic_write(out, build)
    lib = ctypes.CDLL(str(out))
    lib.pt_forward.restype = ctypes.c_int
    lib.pt_forward.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.pt_amx_init.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=1)
def amx_available() -> bool:
    """Whether the native matmuls may run on AMX tiles: the CPU has them, Linux granted this
    process the tile state, and POSTTRAIN_AMX is not 0."""
    if os.environ.get("POSTTRAIN_AMX", "1") == "0" or not {"amx_tile", "amx_bf16"} <= cpu_flags():
        return False
    try:
        return library().pt_amx_init() == 0
    except NativeError:  # no compiler: the native decoder is unavailable altogether, and says so there
        return False


class _Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in
                ("dtype", "n_layers", "hidden", "n_heads", "n_kv", "head_dim", "inter", "vocab")] + [
        ("eps", ctypes.c_float), ("max_len", ctypes.c_int), ("n_seq", ctypes.c_int), ("n_threads", ctypes.c_int)] + [
        (name, ctypes.c_void_p) for name in
        ("embed", "final_norm", "head", "attn_norm", "mlp_norm", "wqkv", "wo", "wgu", "wdown",
         "bqkv", "bo", "bgu", "bdown", "kcache", "vcache", "cos", "sin")] + [
        (name, ctypes.c_int) for name in ("wtype", "head_wtype", "qgroup")] + [
        (name, ctypes.c_void_p) for name in
        ("sqkv", "so", "sgu", "sdown", "mqkv", "mo", "mgu", "mdown", "head_scale", "embed_scale")]
WTYPES = {"int8": 2, "int4": 3}


def quant_layout(model) -> tuple[str | None, int | None, str | None]:
    """(mode, group size, why not) of the decoder's projections: all float (None) or all one integer mode."""
    from posttrain.quantized import QuantLinear

    base = base_model(model)
    modes = set()
    for layer in base.model.layers:
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                    layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            modes.add((lin.mode, lin.group_size) if isinstance(lin, QuantLinear) else (None, None))
    if len(modes) > 1:
        return None, None, "the projections mix quantized and float (or differently quantized) layers"
    mode, group = modes.pop()
    if mode == "int8dyn":
        return None, None, "int8 dynamic activations run on the PyTorch path"
    if mode is not None and group and (group % 32 or group < 32):
        return None, None, f"group size {group} is not a multiple of 32"
    return mode, group, None


def lora_layers(model) -> tuple[dict[int, torch.nn.Module], str | None]:
    """({id(module): PEFT LoRA Linear} under the HF model, why they cannot be folded or None).

    Foldable: PEFT LoRA (not DoRA or another variant) on nn.Linear layers, no LoRA bias, no
    modules_to_save copies; what the packed copy computes is then exactly W + scale·B·A.
    """
    if not hasattr(model, "peft_config"):
        return {}, None
    cfgs = model.peft_config.values()
    if any(str(getattr(getattr(c, "peft_type", None), "value", "")) != "LORA" for c in cfgs):
        return {}, "the model carries PEFT adapters other than LoRA (merge them first)"
    if any(getattr(c, "use_dora", False) for c in cfgs):
        return {}, "DoRA adapters do not fold into the packed weights (merge them first)"
    from peft.tuners.lora.layer import Linear as LoraLinear

    layers = {}
    for module in base_model(model).modules():
        if hasattr(module, "modules_to_save"):
            return {}, "PEFT modules_to_save copies are not supported (merge them first)"
        if not hasattr(module, "lora_A"):
            continue
        if not isinstance(module, LoraLinear) or type(module.base_layer) is not torch.nn.Linear:
            return {}, f"LoRA on a {type(module).__name__} does not fold (merge it first)"
        if getattr(module, "lora_variant", None) or any(b.bias is not None for b in module.lora_B.values()):
            return {}, "LoRA variants and LoRA biases do not fold (merge them first)"
        if getattr(module, "fan_in_fan_out", False):
            return {}, "LoRA on fan-in-fan-out (Conv1D-style) weights does not fold (merge it first)"
        if module.merged and module.disable_adapters:  # PEFT would unmerge on the next forward
            return {}, "a merged LoRA layer with adapters disabled (unmerge it first)"
        layers[id(module)] = module
    return layers, None


def _is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def unsupported_reason(model) -> str | None:
    """Why the native decoder cannot run this model here, or None if it can."""
    if os.environ.get("POSTTRAIN_NATIVE", "1") == "0":
        return "disabled by POSTTRAIN_NATIVE=0"
    _, why = lora_layers(model)
    if why:
        return why
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return "the model has forward hooks (e.g. bottleneck adapters), which only the PyTorch path runs"
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in MODEL_TYPES:
        return f"model type {getattr(cfg, 'model_type', None)!r} is not one of {', '.join(MODEL_TYPES)}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} is not silu"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return "sliding-window attention is not supported"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) in ("dynamic", "longrope"):
        return f"RoPE type {rope.get('rope_type', rope.get('type'))!r} depends on the length"
    params = list(model.parameters())
    if any(p.device.type != "cpu" for p in params):
        return "the model is not on the CPU"
    dtypes = {p.dtype for n, p in model.named_parameters() if not _is_lora_param(n)}  # LoRA folds into these
    if dtypes not in ({torch.float32}, {torch.bfloat16}):
        return f"parameters must be all fp32 or all bf16, got {sorted(map(str, dtypes))}"
    mode, _, why = quant_layout(model)
    if why:
        return why
    if mode is not None and dtypes != {torch.bfloat16}:
        return "quantized weights run with bf16 activations: load the model with dtype bf16"
    flags = cpu_flags()
    need = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} | ({"avx512_bf16"} if torch.bfloat16 in dtypes else set())
    if not need <= flags:
        return f"the CPU lacks {', '.join(sorted(need - flags))}"
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if cfg.hidden_size % 16 or cfg.intermediate_size % 16 or hd % 32 or hd > 256 or cfg.num_attention_heads % kv:
        return "hidden/intermediate sizes must be multiples of 16 and the head size a multiple of 32 up to 256"
    if compiler() is None:
        return "no C compiler found (set CC or install gcc)"
    return None


def _pack(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> blocks of 16 rows: bf16 [N/16, K/2, 16, 2], fp32 [N/16, K, 16] (N padded with zeros)."""
    n, k = w.shape
    pad = (-n) % 16
    if pad:
        w = torch.cat([w, w.new_zeros(pad, k)])
    if w.dtype == torch.bfloat16:
        return w.reshape(-1, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()
    return w.reshape(-1, 16, k).permute(0, 2, 1).contiguous()


def _pack_q(q: torch.Tensor, int4: bool) -> torch.Tensor:
    """int8 [N, K] -> [N/16, K/2, 16, 2]; packed int4 [N, K/2] -> [N/16, K/2, 16] (N padded with zeros)."""
    n, k = q.shape
    pad = (-n) % 16
    if pad:
        q = torch.cat([q, q.new_zeros(pad, k)])
    if int4:
        return q.reshape(-1, 16, k).permute(0, 2, 1).contiguous()
    return q.reshape(-1, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def _pack_scale(s: torch.Tensor) -> torch.Tensor:
    """fp16 [N, G] -> raw fp16 bits [N/16, G, 16] (the C side converts with vcvtph2ps)."""
    n, g = s.shape
    pad = (-n) % 16
    if pad:
        s = torch.cat([s, s.new_zeros(pad, g)])
    return s.to(torch.float16).reshape(-1, 16, g).permute(0, 2, 1).contiguous().view(torch.int16)


def _signature(model) -> tuple:
    """What the packed copy depends on: every tensor, and the LoRA state folded into it
    (disable_adapter(), set_adapter() and merges change the weights without a tensor write)."""
    lora = tuple((m.disable_adapters, tuple(m.merged_adapters), tuple(m.active_adapters), tuple(m.scaling.items()))
                 for m in model.modules() if hasattr(m, "lora_A"))
    # inference tensors (made under torch.inference_mode) have no version counter: their pointer stands in
    return tuple((p.data_ptr(), -1 if p.is_inference() else p._version)
                 for p in [*model.parameters(), *model.buffers()]) + lora


def _ptrs(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() if t is not None else None for t in tensors])


@dataclass(eq=False)
class NativeCache:
    """A KV cache for `NativeLM.forward`: the C struct pointing at the packed weights and at its own
    K/V tensors (`keep` holds whatever else the struct points at)."""

    struct: _Model
    n_seq: int
    max_len: int
    kcache: list[torch.Tensor]
    vcache: list[torch.Tensor]
    keep: list


class NativeLM:
    """Packed weights of one model plus, after `allocate`, a KV cache of `n_seq` sequences."""

    def __init__(self, model):
        base = base_model(model)
        cfg = base.config
        self.config = cfg
        self.model = weakref.ref(model)  # the model packed (weak: _PACKED's value must not keep its key alive)
        self.signature = _signature(model)  # LoRA A/B included: a training step repacks
        self.dtype = next(p.dtype for n, p in model.named_parameters() if not _is_lora_param(n))
        lora, why = lora_layers(model)
        if why:
            raise NativeError(why)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.rotary = base.model.rotary_emb
        layers = base.model.layers
        keep: list[torch.Tensor] = []  # every tensor the C side points at

        def f32(t):
            t = t.detach().float().contiguous()
            keep.append(t)
            return t

        def bias(*linears):
            if all(lin.bias is None for lin in linears):
                return None
            return f32(torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                                  for lin in linears]))

        from posttrain.quantized import QuantEmbedding, QuantLinear

        mode, group, _ = quant_layout(model)
        self.wtype, self.qgroup = WTYPES.get(mode, 0), group or 0
        scales: dict[str, list] = {k: [] for k in ("sqkv", "so", "sgu", "sdown", "mqkv", "mo", "mgu", "mdown",
                                                   "shead")}

        def folded(lin) -> torch.Tensor:
            """The weight the layer computes with: a LoRA layer's base plus scale·B·A of its active adapters."""
            layer = lora.get(id(lin))
            if layer is None:
                return lin.weight.detach()
            weight = layer.base_layer.weight.detach()
            if layer.merged or layer.disable_adapters:  # merged: the base holds the delta already
                return weight
            out = weight.to(torch.float32, copy=True)  # never .float(): an fp32 weight would be written in place
            for name in layer.active_adapters:
                if name in layer.lora_A:
                    out.addmm_(layer.lora_B[name].weight.detach().float(), layer.lora_A[name].weight.detach().float(),
                               alpha=float(layer.scaling[name]))
            return out.to(weight.dtype)

        def packed(*linears, slot: str):
            """Packed weights; for integer weights their packed scales (and minimums) go to scales[slot]."""
            if isinstance(linears[0], QuantLinear):
                t = _pack_q(torch.cat([lin.qweight for lin in linears]), linears[0].mode == "int4")
                sc = _pack_scale(torch.cat([lin.scale for lin in linears]))
                keep.append(sc)
                scales["s" + slot].append(sc)
                if linears[0].mode == "int4":
                    mn = _pack_scale(torch.cat([lin.minimum for lin in linears]))
                    keep.append(mn)
                    scales["m" + slot].append(mn)
            else:
                t = _pack(torch.cat([folded(lin) for lin in linears]))
            keep.append(t)
            return t

        attn = [layer.self_attn for layer in layers]
        mlp = [layer.mlp for layer in layers]
        emb = base.model.embed_tokens
        self.embed_scale = None
        if isinstance(emb, QuantEmbedding):
            self.embed = emb.qweight.contiguous()
            self.embed_scale = f32(emb.scale[:, 0])
        else:
            self.embed = emb.weight.detach().contiguous()
        keep.append(self.embed)
        self.arrays = {
            "attn_norm": _ptrs([f32(layer.input_layernorm.weight) for layer in layers]),
            "mlp_norm": _ptrs([f32(layer.post_attention_layernorm.weight) for layer in layers]),
            "wqkv": _ptrs([packed(a.q_proj, a.k_proj, a.v_proj, slot="qkv") for a in attn]),
            "bqkv": _ptrs([bias(a.q_proj, a.k_proj, a.v_proj) for a in attn]),
            "wo": _ptrs([packed(a.o_proj, slot="o") for a in attn]),
            "bo": _ptrs([bias(a.o_proj) for a in attn]),
            "wgu": _ptrs([packed(m.gate_proj, m.up_proj, slot="gu") for m in mlp]),
            "bgu": _ptrs([bias(m.gate_proj, m.up_proj) for m in mlp]),
            "wdown": _ptrs([packed(m.down_proj, slot="down") for m in mlp]),
            "bdown": _ptrs([bias(m.down_proj) for m in mlp]),
        }
        self.arrays.update({k: _ptrs(v) for k, v in scales.items() if v and k != "shead"})
        if base.lm_head.bias is not None:
            raise NativeError("an LM head with a bias is not supported")
        head = base.lm_head
        self.head_wtype, self.head_scale = 0, None
        if isinstance(head, QuantLinear):
            if head.mode != "int8" or head.group_size:
                raise NativeError(f"an LM head quantized as {head.mode} (group {head.group_size}) is not supported")
            self.head_wtype = 2
        self.head = packed(head, slot="head")
        if self.head_wtype:
            self.head_scale = scales["shead"][0]
        self.final_norm = f32(base.model.norm.weight)
        self.keep = keep
        self.vocab = base.lm_head.out_features
        self.n_seq = 0
        self.max_len = 0
        self.cache: NativeCache | None = None
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.lib = library()
        q_w = self.n_heads * self.head_dim
        self.amx = (self.dtype == torch.bfloat16 and amx_available()
                    and not (cfg.hidden_size % 32 or cfg.intermediate_size % 32 or q_w % 32))

    def rope_tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos and sin [n, head_dim] of positions 0..n-1, computed once and sliced: the rotary
        module took 21-25 ms for 513 positions on a busy 2-core machine, paid by every generate call. A
        position's row does not depend on how many are computed (one product per element)."""
        have = self._rope[0].shape[0] if self._rope is not None else 0
        if "dynamic" in str(getattr(self.rotary, "rope_type", "default")):  # frequencies depend on the length
            have, self._rope = 0, None
        if n > have or self._rope is None:
            size = max(n, 2 * have)
            cos, sin = self.rotary(torch.zeros(1), torch.arange(size)[None])
            self._rope = (cos[0].float().contiguous(), sin[0].float().contiguous())
        return self._rope[0][:n], self._rope[1][:n]

    def allocate(self, n_seq: int, max_len: int) -> None:
        """Room for `n_seq` sequences of up to `max_len` tokens in the default cache (what `forward`
        uses without `cache=`); its contents are not kept."""
        self.cache = self.new_cache(n_seq, max_len)
        self.n_seq, self.max_len = n_seq, max_len

    def new_cache(self, n_seq: int, max_len: int, like: "NativeCache | None" = None) -> "NativeCache":
        """A KV cache of its own (not touched by `allocate`): a continuous batch keeps one across
        steps while other code decodes with the same packed weights. `like`: copy that cache's
        contents in (its sequences and positions must fit), to grow a cache without re-prefilling."""
        cfg = self.config
        k_shape = (n_seq, self.n_kv, self.head_dim, max_len)  # K transposed: keys along the lanes
        v_shape = (n_seq, max_len, self.n_kv, self.head_dim)
        kcache = [torch.empty(k_shape, dtype=self.dtype) for _ in range(cfg.num_hidden_layers)]
        vcache = [torch.empty(v_shape, dtype=self.dtype) for _ in range(cfg.num_hidden_layers)]
        if like is not None:
            if like.n_seq > n_seq or like.max_len > max_len:
                raise ValueError(f"a cache of {like.n_seq} x {like.max_len} does not fit in {n_seq} x {max_len}")
            for new, old in zip(kcache, like.kcache):
                new[:like.n_seq, :, :, :like.max_len] = old
            for new, old in zip(vcache, like.vcache):
                new[:like.n_seq, :like.max_len] = old
        cos, sin = self.rope_tables(max_len)
        arrays = {"kcache": _ptrs(kcache), "vcache": _ptrs(vcache)}
        m = _Model(dtype=int(self.dtype == torch.bfloat16), n_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
                   n_heads=self.n_heads, n_kv=self.n_kv, head_dim=self.head_dim, inter=cfg.intermediate_size,
                   vocab=self.vocab, eps=float(cfg.rms_norm_eps), max_len=max_len, n_seq=n_seq,
                   n_threads=torch.get_num_threads())
        m.embed, m.final_norm, m.head = self.embed.data_ptr(), self.final_norm.data_ptr(), self.head.data_ptr()
        m.cos, m.sin = cos.data_ptr(), sin.data_ptr()
        m.wtype, m.head_wtype, m.qgroup = self.wtype, self.head_wtype, self.qgroup
        m.head_scale = self.head_scale.data_ptr() if self.head_scale is not None else None
        m.embed_scale = self.embed_scale.data_ptr() if self.embed_scale is not None else None
        for name, arr in {**self.arrays, **arrays}.items():
            setattr(m, name, ctypes.cast(arr, ctypes.c_void_p))
        return NativeCache(m, n_seq, max_len, kcache, vcache, [cos, sin, arrays])

    def forward(self, tokens: list[int], seq: list[int], pos: list[int], out_rows: list[int],
                cache: "NativeCache | None" = None) -> torch.Tensor:
        """Run rows (token, sequence, position); K/V land in the cache (`cache`, else the one
        `allocate` made); fp32 logits of `out_rows`.

        Where `self.amx`, every call's matmuls run on AMX tiles (as fast as the vdpbf16ps kernels
        at batch 1 and 4x faster at 100 rows on one core): one path for every call, so a verified
        draft still matches single steps bit for bit.
        """
        if not tokens:
            raise ValueError("forward needs at least one row")
        cache = self.cache if cache is None else cache
        if cache is None:
            raise ValueError("no cache: call allocate() first")
        if max(pos) >= cache.max_len:
            raise ValueError(f"position {max(pos)} is past the allocated length {cache.max_len}")
        tok = torch.tensor(tokens, dtype=torch.int64)
        seq_t = torch.tensor(seq, dtype=torch.int32)
        pos_t = torch.tensor(pos, dtype=torch.int32)
        rows = torch.tensor(out_rows, dtype=torch.int32)
        logits = torch.empty((len(out_rows), self.vocab), dtype=torch.float32)
        code = self.lib.pt_forward(ctypes.byref(cache.struct), len(tokens), tok.data_ptr(), seq_t.data_ptr(),
                                   pos_t.data_ptr(), len(out_rows), rows.data_ptr(), logits.data_ptr(),
                                   int(self.amx))
        if code:
            raise ValueError({1: f"a token id is outside the vocabulary of {self.vocab}",
                              2: "a sequence index or position is outside the allocated cache",
                              3: "an output row is outside the rows given",
                              4: "out of memory for the step's buffers"}.get(code, f"native forward failed ({code})"))
        return logits


def native_lm(model, required: bool = False) -> NativeLM | None:
    """The model's NativeLM (packed once; re-packed when its weights changed), or None if unsupported."""
    reason = unsupported_reason(model)
    if reason is not None:
        if required:
            raise NativeError(f"backend='native' cannot run here: {reason}")
        from posttrain.kernels import fallback_once

        fallback_once("native decoder", getattr(getattr(model, "config", None), "model_type", None), reason)
        return None
    cached = _PACKED.get(model)
    if cached is not None and cached.signature == _signature(model):
        return cached
    _PACKED.pop(model, None)  # free the stale copy before packing a new one
    try:
        lm = NativeLM(model)
    except NativeError as exc:
        if required:
            raise
        warnings.warn(f"native decoder unavailable, using the PyTorch path: {exc}", stacklevel=2)
        return None
    _PACKED[model] = lm
    return lm
