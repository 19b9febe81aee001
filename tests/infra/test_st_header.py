"""Header validation: a corpus of broken files, each with its exact message, and a property test."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from infra.errors import CheckpointError, HeaderError, TruncatedFileError
from infra.safetensors import parse_header, read_header
from infra.storage import LocalStorage

from .st_helpers import raw_file, valid_header

U = "file:///ckpt/model.safetensors"


def _with(**changes: Any) -> dict[str, Any]:
    h = valid_header()
    for name, entry in changes.items():
        if entry is None:
            del h[name]
        else:
            h[name] = entry
    return h


def _dup_names() -> bytes:
    text = (
        b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
        b'"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}'
    )
    return raw_file(text, b"\0\0")


CUT = "the file is incomplete (still being copied, or cut short)"
CORPUS: list[tuple[str, bytes, str]] = [
    ("empty", b"", f"{U}: file is 0 bytes, too short for a safetensors header; {CUT}"),
    ("truncated length", b"\x10\x00\x00", f"{U}: file is 3 bytes, too short for a safetensors header; {CUT}"),
    (
        "truncated data",
        raw_file(valid_header(), b"\0" * 19),
        f"{U}: tensor 'b' ends at byte 191, past the end of the file (190 bytes); {CUT}",
    ),
    (
        "header length beyond file",
        raw_file(valid_header(), b"\0" * 20, length=10_000),
        f"{U}: header length 10000 runs past the end of the file (191 bytes); {CUT}",
    ),
    (
        "lying header length (too short)",
        raw_file(valid_header(), b"\0" * 20, length=50),
        f"{U}: header is not valid JSON (Expecting value: line 1 column 51 (char 50))",
    ),
    (
        "header over 100 MB",
        struct.pack("<Q", 100_000_001) + b"{}",
        f"{U}: header length 100000001 exceeds the 100000000-byte limit",
    ),
    (
        "overlapping offsets",
        raw_file(_with(b={"dtype": "BF16", "shape": [2], "data_offsets": [12, 16]}), b"\0" * 16),
        f"{U}: tensor 'b': data_offsets [12, 16] overlap tensor 'w' (which ends at 16)",
    ),
    (
        "gap in offsets",
        raw_file(_with(b={"dtype": "BF16", "shape": [2], "data_offsets": [20, 24]}), b"\0" * 24),
        f"{U}: tensor 'b': gap of 4 bytes after tensor 'w'",
    ),
    (
        "gap at start",
        raw_file({"w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}, b"\0\0"),
        f"{U}: tensor 'w': gap of 1 bytes at the start of the data",
    ),
    (
        "trailing bytes",
        raw_file(valid_header(), b"\0" * 21),
        f"{U}: 1 bytes after the last tensor; the data buffer must be covered exactly",
    ),
    (
        "unknown dtype",
        raw_file(_with(b={"dtype": "Q4", "shape": [2], "data_offsets": [16, 20]}), b"\0" * 20),
        f"{U}: tensor 'b': unknown dtype 'Q4' (known: BF16, BOOL, F16, F32, F64, F8_E4M3, "
        "F8_E5M2, F8_E8M0, I16, I32, I64, I8, U16, U32, U64, U8)",
    ),
    (
        "shape does not match size",
        raw_file(_with(w={"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}), b"\0" * 20),
        f"{U}: tensor 'w': F32[2, 3] needs 24 bytes but data_offsets [0, 16] hold 16",
    ),
    (
        "negative dim",
        raw_file(_with(w={"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}), b"\0" * 20),
        f"{U}: tensor 'w': shape [-2, -2] is not a list of non-negative integers",
    ),
    (
        "reversed offsets",
        raw_file(_with(w={"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 0]}), b"\0" * 20),
        f"{U}: tensor 'w': data_offsets [16, 0] is not [begin, end] with begin <= end",
    ),
    (
        "missing field",
        raw_file(_with(w={"dtype": "F32", "shape": [4]}), b"\0" * 20),
        f"{U}: tensor 'w': entry keys are ['dtype', 'shape'], expected ['data_offsets', 'dtype', 'shape']",
    ),
    (
        "non-UTF-8 header",
        raw_file(b'{"\xff": 1}  ', b""),
        f"{U}: header is not valid UTF-8 (byte 2)",
    ),
    (
        "not JSON",
        raw_file(b"{nope}", b""),
        f"{U}: header is not valid JSON (Expecting property "
        "name enclosed in double quotes: line 1 column 2 (char 1))",
    ),
    ("not an object", raw_file(b"[1, 2]", b""), f"{U}: header does not start with '{{'"),
    ("duplicate names", _dup_names(), f"{U}: duplicate key 'w' in the header JSON"),
    (
        "bad metadata",
        raw_file(_with(__metadata__={"a": 1}), b"\0" * 20),
        f"{U}: __metadata__ must map strings to strings",
    ),
]


@pytest.mark.parametrize(("case", "blob", "message"), CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_file_gets_exact_message(tmp_path, case: str, blob: bytes, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(HeaderError) as err:
        parse_header(blob, len(blob), U)
    assert str(err.value) == message
    # A file shorter than its header says is one a copy has not finished: sync waits for it.
    assert isinstance(err.value, TruncatedFileError) == (CUT in message)
    # The same file read through storage gives the same verdict, naming the real URI.
    store = LocalStorage(tmp_path)
    store.put_bytes("model.safetensors", blob)
    with pytest.raises(HeaderError) as err2:
        read_header(store, "model.safetensors")
    assert str(err2.value) == message.replace(U, store.uri("model.safetensors"))


def test_valid_header_fields_and_absolute_offsets() -> None:
    blob = save(
        {"w": torch.zeros(2, 2), "b": torch.zeros(2, dtype=torch.bfloat16), "e": torch.zeros(0, 3)},
        metadata={"format": "pt"},
    )
    h = parse_header(blob, len(blob), U)
    (n,) = struct.unpack("<Q", blob[:8])
    assert h.data_start == 8 + n and h.file_size == len(blob)
    assert [(t.name, t.dtype, t.shape) for t in h.tensors] == [
        ("e", "F32", (0, 3)),
        ("w", "F32", (2, 2)),
        ("b", "BF16", (2,)),
    ]
    assert h.tensor("b").begin == h.data_start + 16 and h.tensor("b").end == len(blob)
    assert h.metadata == {"format": "pt"}


def test_large_header_needs_second_read(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tensors = {f"layer.{i:05d}.weight": torch.zeros(1) for i in range(2000)}
    blob = save(tensors)
    assert struct.unpack("<Q", blob[:8])[0] > 64 * 1024
    store = LocalStorage(tmp_path)
    store.put_bytes("m.safetensors", blob)
    assert len(read_header(store, "m.safetensors").tensors) == 2000


def _mutations() -> st.SearchStrategy[bytes]:
    base = json.dumps(valid_header()).encode()

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        text = bytearray(base)
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, len(text) - 1))
            op = draw(st.sampled_from(["flip", "delete", "insert"]))
            if op == "flip":
                text[pos] = draw(st.integers(0, 255))
            elif op == "delete":
                del text[pos]
            else:
                text.insert(pos, draw(st.sampled_from(b'{}[]",:0123456789-e. ')))
        data = draw(st.binary(max_size=40))
        length = draw(st.one_of(st.none(), st.integers(0, 2**64 - 1)))
        return raw_file(bytes(text), data, length=length)

    return mutate()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=200), _mutations()))
def test_parser_only_raises_header_error(blob: bytes) -> None:
    try:
        parse_header(blob, len(blob), U)
    except HeaderError:
        pass


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8).filter(lambda s: s != "__metadata__"),
        st.tuples(
            st.sampled_from([torch.float32, torch.bfloat16, torch.uint8, torch.int64]),
            st.lists(st.integers(0, 3), max_size=3),
        ),
        max_size=5,
    )
)
def test_parser_accepts_what_safetensors_writes(spec: dict[str, Any]) -> None:
    tensors = {k: torch.zeros(shape, dtype=dt) for k, (dt, shape) in spec.items()}
    blob = save(tensors)
    h = parse_header(blob, len(blob), U)
    assert {t.name for t in h.tensors} == set(tensors)


def test_header_error_is_a_checkpoint_error() -> None:
    assert issubclass(HeaderError, CheckpointError)
