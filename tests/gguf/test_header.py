"""GGUF headers planned before the data: a file written at the planned offsets, in any order,
reads back with the `gguf` package's reader (an independent parser) value for value."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch

from infra.gguf import GGUFTensor, MetadataValue, layout, split_file_name, split_metadata
from quantizers.gguf import dequantize_gguf, quantize_gguf, row_bytes

V = gguf.GGUFValueType


def test_split_written_at_planned_offsets_reads_back(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(1)
    weights = {
        "blk.0.attn_q.weight": (torch.randn(8, 256, generator=generator), "Q4_K"),
        "blk.0.ffn_down.weight": (torch.randn(4, 512, generator=generator), "Q6_K"),
        "token_embd.weight": (torch.randn(3, 64, generator=generator), "Q8_0"),
        "blk.0.attn_norm.weight": (torch.randn(1, 7, generator=generator), "F32"),
    }
    tensors = [
        GGUFTensor(name, (w.shape[1], w.shape[0]) if w.shape[0] > 1 else (w.shape[1],), kind,
                   w.shape[0] * row_bytes(kind, w.shape[1]))
        for name, (w, kind) in weights.items()
    ]
    metadata = {
        gguf.Keys.General.ARCHITECTURE: MetadataValue(V.STRING, "llama"),
        "llama.block_count": MetadataValue(V.UINT32, 1),
        "llama.rope.freq_base": MetadataValue(V.FLOAT32, 10000.0),
        gguf.Keys.Tokenizer.LIST: MetadataValue(V.ARRAY, ["<s>", "é", "▁the"], V.STRING),
        gguf.Keys.Tokenizer.TOKEN_TYPE: MetadataValue(V.ARRAY, [3, 1, 1], V.INT32),
        **split_metadata(1, 3, 12),
    }
    header, offsets, size = layout(metadata, tensors)
    assert all(offset % 32 == 0 for offset in offsets.values()) and len(header) % 32 == 0
    path = tmp_path / split_file_name(1, 3)
    assert path.name == "model-00002-of-00003.gguf"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, header, 0)
        for name, (weight, kind) in reversed(list(weights.items())):  # any order
            os.pwrite(fd, quantize_gguf(weight, kind).numpy().tobytes(), offsets[name])
    finally:
        os.close(fd)
    reader = gguf.GGUFReader(path)
    assert reader.fields[gguf.Keys.General.ARCHITECTURE].contents() == "llama"
    assert reader.fields[gguf.Keys.Split.LLM_KV_SPLIT_NO].contents() == 1
    assert reader.fields[gguf.Keys.Split.LLM_KV_SPLIT_COUNT].contents() == 3
    assert reader.fields[gguf.Keys.Tokenizer.LIST].contents() == ["<s>", "é", "▁the"]
    assert reader.fields["llama.rope.freq_base"].contents() == 10000.0
    read = {t.name: t for t in reader.tensors}
    assert list(read) == list(weights)
    for name, (weight, kind) in weights.items():
        tensor = read[name]
        assert tensor.tensor_type.name == kind
        assert int(tensor.data_offset) == offsets[name]
        expected = dequantize_gguf(quantize_gguf(weight, kind), kind, tuple(weight.shape))
        values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        assert np.array_equal(values.reshape(weight.shape), expected.numpy())
