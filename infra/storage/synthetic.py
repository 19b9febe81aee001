"""A read-only checkpoint that exists only as a declared layout: bytes are made up on read.

Nobody can keep a trillion-parameter checkpoint on a development machine, yet planning,
scheduling and conversion at that scale must be exercised. `SyntheticStorage` serves
`config.json`, `model.safetensors.index.json` and safetensors files whose headers follow a real
model's published layout (Kimi-K2 as published in block FP8, the same layout in bf16, a dense
Llama-405B in bf16), and generates tensor bytes on demand:

- Every value comes from a counter-based generator: a SplitMix64 hash of (seed, tensor name,
  element index) picks a value from a fixed table. Any byte range is served without the rest
  of the file and two reads of the same range always agree, in any process.
- Values are finite and realistically scaled: N(0, 0.02) weights (N(1, 0.02) for norms), valid
  float8_e4m3fn codes (never NaN) with positive fp32 `weight_scale_inv` tiles for block FP8.
- An optional cost model imitates object storage: `latency_ms` per ranged read and `node_mbps`,
  a bandwidth cap shared by every read of this process (one conversion task per node in the
  local multi-node cluster, so per process is per node there).

URI: `synthetic://PRESET?key=value&...`, e.g. `synthetic://kimi-k2-bf16?layers=4&experts=8`;
the keys are the fields of `SyntheticSpec` and override the preset's published dimensions.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from infra.errors import AccessDenied, InvalidURI, ObjectNotFound, StorageError
from infra.storage.base import ObjectInfo, ObjectWriter, Storage, WriteResult, check_key, check_prefix

__all__ = [
    "PRESETS",
    "SCHEME",
    "SyntheticSpec",
    "SyntheticStorage",
    "TensorDecl",
    "parse_synthetic_uri",
]

SCHEME = "synthetic"
INDEX_KEY = "model.safetensors.index.json"
Preset = Literal["kimi-k2", "kimi-k2-bf16", "llama-405b"]

_DTYPE_SIZE = {"BF16": 2, "F32": 4, "F8_E4M3": 1}
_FP8_BLOCK = 128
_WEIGHT_STD = 0.02
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


class SyntheticSpec(BaseModel):
    """A model's dimensions; defaults are Kimi-K2's published config.json (DeepSeek-V3 layout).

    Fields a preset does not use (MoE fields for the dense Llama) are ignored by it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: Preset = "kimi-k2"
    layers: int = Field(61, ge=1)
    hidden: int = Field(7168, ge=1)
    intermediate: int = Field(18432, ge=1)  # dense MLP width
    moe_intermediate: int = Field(2048, ge=1)  # one routed / shared expert's width
    experts: int = Field(384, ge=0)  # routed experts per MoE layer
    shared_experts: int = Field(1, ge=0)
    dense_layers: int = Field(1, ge=0)  # the first layers have a dense MLP (first_k_dense_replace)
    heads: int = Field(64, ge=1)
    kv_heads: int = Field(64, ge=1)  # GQA key/value heads (Llama only)
    head_dim: int = Field(128, ge=1)  # Llama only
    q_lora_rank: int = Field(1536, ge=1)
    kv_lora_rank: int = Field(512, ge=1)
    qk_nope_head_dim: int = Field(128, ge=1)
    qk_rope_head_dim: int = Field(64, ge=1)
    v_head_dim: int = Field(128, ge=1)
    vocab: int = Field(163840, ge=1)
    seed: int = Field(0, ge=0)
    latency_ms: float = Field(0.0, ge=0)  # added to every ranged read
    node_mbps: float = Field(0.0, ge=0)  # bandwidth cap in MB/s (0: none)

    @property
    def cost_free(self) -> SyntheticSpec:
        """The same checkpoint without the cost model: what decides the bytes and the identity."""
        return self.model_copy(update={"latency_ms": 0.0, "node_mbps": 0.0})


# Published dimensions that differ from the Kimi-K2 defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "kimi-k2": {},
    "kimi-k2-bf16": {},
    "llama-405b": {
        "layers": 126, "hidden": 16384, "intermediate": 53248, "heads": 128, "kv_heads": 8,
        "head_dim": 128, "vocab": 128256, "experts": 0, "shared_experts": 0, "dense_layers": 126,
    },
}


def parse_synthetic_uri(uri: str) -> SyntheticSpec:
    """The spec a `synthetic://PRESET?key=value...` URI declares; InvalidURI naming the problem."""
    parts = urlsplit(uri)
    if parts.scheme.lower() != SCHEME:
        raise InvalidURI(f"{uri}: not a {SCHEME}:// URI")
    if parts.path.strip("/"):
        raise InvalidURI(f"{uri}: a synthetic checkpoint has no folders (expected {SCHEME}://PRESET?...)")
    if parts.netloc not in PRESETS:
        raise InvalidURI(f"{uri}: unknown synthetic model {parts.netloc!r} (known: {', '.join(PRESETS)})")
    fields: dict[str, Any] = {**PRESETS[parts.netloc], "preset": parts.netloc}
    for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if key == "preset":
            raise InvalidURI(f"{uri}: the preset is the URI's host, not a query key")
        fields[key] = value
    try:
        return SyntheticSpec(**fields)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(p) for p in problem["loc"])
        raise InvalidURI(f"{uri}: {where}: {problem['msg']}") from exc


def spec_uri(spec: SyntheticSpec, key: str = "") -> str:
    """The canonical URI of `spec` (only fields that differ from the preset are written)."""
    base = SyntheticSpec(**{**PRESETS[spec.preset], "preset": spec.preset})
    query = {
        name: value
        for name, value in spec.model_dump().items()
        if name != "preset" and value != getattr(base, name)
    }
    path = f"/{key}" if key else ""
    return f"{SCHEME}://{spec.preset}{path}" + (f"?{urlencode(query)}" if query else "")


# --- the layout --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TensorDecl:
    """One declared tensor: its name, dtype, shape and what its values look like."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: Literal["weight", "norm", "scale"] = "weight"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPE_SIZE[self.dtype]


def _linear(name: str, rows: int, cols: int, fp8: bool) -> list[TensorDecl]:
    if not fp8:
        return [TensorDecl(f"{name}.weight", "BF16", (rows, cols))]
    tiles = (math.ceil(rows / _FP8_BLOCK), math.ceil(cols / _FP8_BLOCK))
    return [
        TensorDecl(f"{name}.weight", "F8_E4M3", (rows, cols)),
        TensorDecl(f"{name}.weight_scale_inv", "F32", tiles, "scale"),
    ]


def _norm(name: str, size: int) -> TensorDecl:
    return TensorDecl(f"{name}.weight", "BF16", (size,), "norm")


def _mlp(prefix: str, hidden: int, width: int, fp8: bool) -> list[TensorDecl]:
    return (
        _linear(f"{prefix}.gate_proj", width, hidden, fp8)
        + _linear(f"{prefix}.up_proj", width, hidden, fp8)
        + _linear(f"{prefix}.down_proj", hidden, width, fp8)
    )


def _mla_layer(spec: SyntheticSpec, i: int, fp8: bool) -> list[TensorDecl]:
    """One DeepSeek-V3 / Kimi-K2 decoder layer, attention first, then shared, then routed experts
    (so consecutive work units hold one kind of tensor)."""
    p, h = f"model.layers.{i}", spec.hidden
    qk_head = spec.qk_nope_head_dim + spec.qk_rope_head_dim
    attention = [
        _norm(f"{p}.input_layernorm", h),
        *_linear(f"{p}.self_attn.q_a_proj", spec.q_lora_rank, h, fp8),
        _norm(f"{p}.self_attn.q_a_layernorm", spec.q_lora_rank),
        *_linear(f"{p}.self_attn.q_b_proj", spec.heads * qk_head, spec.q_lora_rank, fp8),
        *_linear(f"{p}.self_attn.kv_a_proj_with_mqa", spec.kv_lora_rank + spec.qk_rope_head_dim, h, fp8),
        _norm(f"{p}.self_attn.kv_a_layernorm", spec.kv_lora_rank),
        *_linear(f"{p}.self_attn.kv_b_proj",
                 spec.heads * (spec.qk_nope_head_dim + spec.v_head_dim), spec.kv_lora_rank, fp8),
        *_linear(f"{p}.self_attn.o_proj", h, spec.heads * spec.v_head_dim, fp8),
        _norm(f"{p}.post_attention_layernorm", h),
    ]
    if i < spec.dense_layers:
        return attention + _mlp(f"{p}.mlp", h, spec.intermediate, fp8)
    router = [
        TensorDecl(f"{p}.mlp.gate.weight", "BF16", (spec.experts, h)),
        TensorDecl(f"{p}.mlp.gate.e_score_correction_bias", "F32", (spec.experts,), "norm"),
    ]
    shared = _mlp(f"{p}.mlp.shared_experts", h, spec.moe_intermediate * spec.shared_experts, fp8)
    routed = [
        d for e in range(spec.experts) for d in _mlp(f"{p}.mlp.experts.{e}", h, spec.moe_intermediate, fp8)
    ]
    return attention + (shared if spec.shared_experts else []) + router + routed


def _llama_layer(spec: SyntheticSpec, i: int) -> list[TensorDecl]:
    p, h = f"model.layers.{i}", spec.hidden
    kv = spec.kv_heads * spec.head_dim
    return [
        _norm(f"{p}.input_layernorm", h),
        TensorDecl(f"{p}.self_attn.q_proj.weight", "BF16", (spec.heads * spec.head_dim, h)),
        TensorDecl(f"{p}.self_attn.k_proj.weight", "BF16", (kv, h)),
        TensorDecl(f"{p}.self_attn.v_proj.weight", "BF16", (kv, h)),
        TensorDecl(f"{p}.self_attn.o_proj.weight", "BF16", (h, spec.heads * spec.head_dim)),
        _norm(f"{p}.post_attention_layernorm", h),
        *_mlp(f"{p}.mlp", h, spec.intermediate, False),
    ]


def file_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def file_count(spec: SyntheticSpec) -> int:
    return spec.layers  # one file per decoder layer, as the published checkpoints roughly do


def file_tensors(spec: SyntheticSpec, index: int) -> list[TensorDecl]:
    """The tensors of file `index`: layer `index`, plus the embeddings in the first file and the
    final norm and output head in the last."""
    fp8 = spec.preset == "kimi-k2"
    layer = _llama_layer(spec, index) if spec.preset == "llama-405b" else _mla_layer(spec, index, fp8)
    if index == 0:
        layer = [TensorDecl("model.embed_tokens.weight", "BF16", (spec.vocab, spec.hidden)), *layer]
    if index == file_count(spec) - 1:
        layer = [*layer, _norm("model.norm", spec.hidden),
                 TensorDecl("lm_head.weight", "BF16", (spec.vocab, spec.hidden))]
    return layer


@dataclass(frozen=True, slots=True)
class _Placed:
    decl: TensorDecl
    begin: int  # absolute offset in the file
    seed: int


@dataclass(frozen=True, slots=True)
class _File:
    header: bytes
    tensors: tuple[_Placed, ...]  # in offset order
    starts: np.ndarray  # begin of each tensor, for bisection
    size: int


def _tensor_seed(spec_seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{spec_seed}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@lru_cache(maxsize=512)
def _layout(spec: SyntheticSpec, index: int) -> _File:
    """File `index`'s header bytes and tensor offsets (cached: workers read one file many times)."""
    decls = file_tensors(spec, index)
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for decl in decls:
        entries[decl.name] = {"dtype": decl.dtype, "shape": list(decl.shape),
                              "data_offsets": [offset, offset + decl.nbytes]}
        offset += decl.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes with spaces
    header = len(text).to_bytes(8, "little") + text
    start = len(header)
    placed, position = [], start
    for decl in decls:
        placed.append(_Placed(decl, position, _tensor_seed(spec.seed, decl.name)))
        position += decl.nbytes
    starts = np.array([p.begin for p in placed], dtype=np.int64)
    return _File(header=header, tensors=tuple(placed), starts=starts, size=position)


# --- the values --------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _tables() -> dict[str, np.ndarray]:
    """65,536-entry lookup tables: a 16-bit uniform lane -> one value's bytes, per kind and dtype.

    The table holds the standard normal's quantiles, so each lane gives a N(0, 1) draw clipped at
    about 4.3 sigma (finite by construction), scaled per kind.
    """
    import torch  # lazily: only a process that reads tensor bytes needs it

    quantiles = (torch.arange(65536, dtype=torch.float64) + 0.5) / 65536
    normal = (torch.erfinv(2 * quantiles - 1) * math.sqrt(2)).to(torch.float32)
    uniform = quantiles.to(torch.float32)
    weight = normal * _WEIGHT_STD
    # An FP8 tile whose real values are N(0, 0.02) has amax ~0.08 and scale_inv ~amax / 448.
    fp8_codes = (normal * (_WEIGHT_STD / 2e-4)).clamp(-448, 448).to(torch.float8_e4m3fn)
    return {
        "weight/BF16": weight.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16),
        "weight/F32": weight.numpy(),
        "weight/F8_E4M3": fp8_codes.view(torch.uint8).numpy(),
        "norm/BF16": (1 + normal * _WEIGHT_STD).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16),
        "norm/F32": (normal * _WEIGHT_STD).numpy(),
        "scale/F32": (2e-4 * (0.75 + 0.5 * uniform)).numpy(),
    }


def _lanes(seed: int, first: int, count: int) -> np.ndarray:
    """`count` 16-bit lanes starting at lane `first` of the SplitMix64 stream keyed by `seed`."""
    word0, word1 = first // 4, (first + count + 3) // 4
    x = np.arange(word0, word1, dtype=np.uint64)
    x += np.uint64(seed)
    x *= _GOLDEN
    x ^= x >> np.uint64(30)
    x *= _MIX1
    x ^= x >> np.uint64(27)
    x *= _MIX2
    x ^= x >> np.uint64(31)
    lanes = x.view(np.uint16)  # little-endian: lane 4k+j is bits 16j..16j+15 of word k
    skip = first - 4 * word0
    return lanes[skip : skip + count]


def _values(placed: _Placed, first: int, count: int) -> np.ndarray:
    """Elements [first, first+count) of a tensor as raw bytes."""
    table = _tables()[f"{placed.decl.kind}/{placed.decl.dtype}"]
    return table[_lanes(placed.seed, first, count)].view(np.uint8)


def _fill(layout: _File, offset: int, out: np.ndarray) -> None:
    """Fill `out` (uint8) with the file's bytes from `offset`."""
    end = offset + len(out)
    if offset < len(layout.header):
        head = layout.header[offset : min(end, len(layout.header))]
        out[: len(head)] = np.frombuffer(head, dtype=np.uint8)
    position = max(offset, len(layout.header))
    i = max(0, int(np.searchsorted(layout.starts, position, side="right")) - 1)
    while position < end and i < len(layout.tensors):
        placed = layout.tensors[i]
        stop = min(end, placed.begin + placed.decl.nbytes)
        if stop > position:
            size = _DTYPE_SIZE[placed.decl.dtype]
            first = (position - placed.begin) // size
            last = (stop - placed.begin + size - 1) // size
            data = _values(placed, first, last - first)
            skip = position - placed.begin - first * size
            out[position - offset : stop - offset] = data[skip : skip + stop - position]
            position = stop
        i += 1


# --- the cost model ----------------------------------------------------------------------------


class _Pacer:
    """Paces this process's reads to a bandwidth, each read also waiting a fixed latency."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free_at = 0.0

    def wait(self, nbytes: int, latency_s: float, bytes_per_s: float) -> None:
        started = time.monotonic()
        done = started + latency_s
        if bytes_per_s > 0:
            with self._lock:
                begin = max(started, self._free_at)
                self._free_at = begin + nbytes / bytes_per_s
                done = max(done, self._free_at)
        if done > started:
            time.sleep(done - started)


_PACER = _Pacer()


@lru_cache(maxsize=4)
def _index_bytes(spec: SyntheticSpec) -> bytes:
    """model.safetensors.index.json: every tensor's file, and the total tensor bytes."""
    count = file_count(spec)
    weight_map, total = {}, 0
    for i in range(count):
        for decl in file_tensors(spec, i):
            weight_map[decl.name] = file_name(i, count)
            total += decl.nbytes
    return json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                      indent=2, sort_keys=True).encode()


# --- the backend ---------------------------------------------------------------------------


class SyntheticStorage(Storage):
    """A checkpoint made of its declared layout; read-only (every write is AccessDenied)."""

    def __init__(self, spec: SyntheticSpec) -> None:
        self.spec = spec
        self._identity = hashlib.sha256(spec.cost_free.model_dump_json().encode()).hexdigest()[:32]

    @classmethod
    def from_uri(cls, uri: str) -> SyntheticStorage:
        return cls(parse_synthetic_uri(uri))

    def __repr__(self) -> str:
        return f"SyntheticStorage({self.uri()!r})"

    def uri(self, key: str = "") -> str:
        return spec_uri(self.spec, key)

    # --- what the checkpoint holds ------------------------------------------------------

    def file_names(self) -> list[str]:
        count = file_count(self.spec)
        return [file_name(i, count) for i in range(count)]

    def _file_index(self, key: str) -> int | None:
        count = file_count(self.spec)
        if key.startswith("model-") and key.endswith(f"-of-{count:05d}.safetensors"):
            number = key.removeprefix("model-").split("-", 1)[0]
            if number.isdigit() and 1 <= int(number) <= count and key == file_name(int(number) - 1, count):
                return int(number) - 1
        return None

    def config(self) -> dict[str, Any]:
        """config.json as the model's publisher ships it (DeepSeek-V3 or Llama keys)."""
        s = self.spec
        if s.preset == "llama-405b":
            return {
                "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s.hidden,
                "intermediate_size": s.intermediate, "num_hidden_layers": s.layers,
                "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "head_dim": s.head_dim,
                "vocab_size": s.vocab, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                "max_position_embeddings": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            }
        config: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "hidden_size": s.hidden, "intermediate_size": s.intermediate,
            "moe_intermediate_size": s.moe_intermediate, "num_hidden_layers": s.layers,
            "num_attention_heads": s.heads, "num_key_value_heads": s.heads,
            "n_routed_experts": s.experts, "n_shared_experts": s.shared_experts,
            "first_k_dense_replace": s.dense_layers, "num_experts_per_tok": min(8, s.experts),
            "q_lora_rank": s.q_lora_rank, "kv_lora_rank": s.kv_lora_rank,
            "qk_nope_head_dim": s.qk_nope_head_dim, "qk_rope_head_dim": s.qk_rope_head_dim,
            "v_head_dim": s.v_head_dim, "vocab_size": s.vocab, "n_group": 1, "topk_group": 1,
            "routed_scaling_factor": 2.827, "rms_norm_eps": 1e-6, "rope_theta": 50000.0,
            "max_position_embeddings": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        }
        if s.preset == "kimi-k2":
            config["quantization_config"] = {
                "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [_FP8_BLOCK, _FP8_BLOCK],
                "activation_scheme": "dynamic",
            }
        return config

    def _side_bytes(self, key: str) -> bytes | None:
        if key == "config.json":
            return (json.dumps(self.config(), indent=2, sort_keys=True) + "\n").encode()
        if key == INDEX_KEY:
            return _index_bytes(self.spec.cost_free)
        return None

    def _layout_of(self, key: str) -> _File:
        index = self._file_index(key)
        if index is None:
            raise ObjectNotFound(f"{self.uri(key)}: not found (the synthetic checkpoint has no such file)")
        return _layout(self.spec.cost_free, index)

    # --- reading -----------------------------------------------------------------------

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        keys = sorted(["config.json", INDEX_KEY, *self.file_names()])
        for key in keys:
            if key.startswith(prefix):
                yield self.stat(key)

    def stat(self, key: str) -> ObjectInfo:
        check_key(key)
        side = self._side_bytes(key) if key in ("config.json", INDEX_KEY) else None
        size = len(side) if side is not None else self._layout_of(key).size
        etag = hashlib.sha256(f"{self._identity}\0{key}".encode()).hexdigest()[:32]
        return ObjectInfo(key=key, size=size, etag=etag)

    def read_range_into(self, key: str, offset: int, buffer: memoryview) -> None:
        check_key(key)
        out = np.frombuffer(buffer.cast("B"), dtype=np.uint8)
        side = self._side_bytes(key) if key in ("config.json", INDEX_KEY) else None
        size = len(side) if side is not None else self._layout_of(key).size
        if offset < 0 or offset + len(out) > size:
            raise StorageError(
                f"{self.uri(key)}: short read: wanted {len(out)} bytes at offset {offset}, "
                f"the object has {size}"
            )
        if side is not None:
            out[:] = np.frombuffer(side[offset : offset + len(out)], dtype=np.uint8)
        else:
            _fill(self._layout_of(key), offset, out)
        if self.spec.latency_ms or self.spec.node_mbps:
            _PACER.wait(len(out), self.spec.latency_ms / 1000, self.spec.node_mbps * 1e6)

    # --- writing: refused ----------------------------------------------------------------

    def _read_only(self, what: str, key: str) -> AccessDenied:
        return AccessDenied(f"{self.uri(key)}: {what} refused: a synthetic checkpoint is read-only")

    def open_writer(self, key: str, *, size_hint: int | None = None, if_absent: bool = False) -> ObjectWriter:
        raise self._read_only("write", key)

    def copy(self, src_key: str, dst_key: str, *, if_absent: bool = False) -> ObjectInfo:
        raise self._read_only("copy", dst_key)

    def delete(self, key: str) -> None:
        raise self._read_only("delete", key)

    def abort_stale_uploads(self, prefix: str = "", *, older_than_s: float = 0.0) -> int:
        return 0  # nothing is ever written, so nothing is ever left half-written

    def adopt(self, key: str, scratch: Any, *, sha256: str | None = None) -> WriteResult:
        raise self._read_only("write", key)
