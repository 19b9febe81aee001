"""GGUF files as a plan: header bytes and every tensor's offset known before any data exists.

    header, offsets, size = layout(metadata, tensors)
    # write `header` at 0 and each tensor's bytes at offsets[name], in any order, from any process

That is what lets one work unit write one split of a model (`model-00002-of-00005.gguf`)
independently: the tensors' types and shapes come from the plan, so their sizes do too.
"""

from infra.gguf.header import GGUFTensor, MetadataValue, layout, split_file_name, split_metadata

__all__ = ["GGUFTensor", "MetadataValue", "layout", "split_file_name", "split_metadata"]
