"""Streaming writer vs safetensors.torch.save_file (byte equality), reader round trips, catalog."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from infra.errors import CatalogError, MissingShardError, PickleWeightsError, TensorSpecError
from infra.safetensors import (
    TensorReader,
    TensorSpec,
    build_catalog,
    open_safetensors_writer,
    read_header,
)
from infra.storage import Storage


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Exact comparison for every dtype (NaN-safe, float8-safe): compare the bytes."""
    return t.reshape(-1).view(torch.uint8)


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.mlp.weight": torch.randn(64, 48, generator=g).to(torch.bfloat16),
        "model.layers.0.norm.weight": torch.randn(48, generator=g),
        "model.layers.0.mlp.weight_packed": torch.randint(
            -(2**31), 2**31 - 1, (64, 6), dtype=torch.int32, generator=g
        ),
        "model.layers.0.mlp.weight_nvfp4": torch.randint(0, 256, (64, 24), dtype=torch.uint8, generator=g),
        "model.layers.0.mlp.weight_scale": torch.randn(64, 3, generator=g).to(torch.float8_e4m3fn),
        "model.layers.0.mlp.weight_shape": torch.tensor([64, 48], dtype=torch.int64),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 7, dtype=torch.float16),
        "mask": torch.tensor([True, False, True]),
    }


def _write(
    storage: Storage, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
):  # type: ignore[no-untyped-def]
    specs = [TensorSpec.of(n, t) for n, t in tensors.items()]
    with open_safetensors_writer(storage, key, specs, metadata) as w:
        for name in w.order:
            w.write(name, tensors[name])
        return w.close()


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}])
def test_writer_bytes_identical_to_save_file(storage: Storage, tmp_path, metadata) -> None:  # type: ignore[no-untyped-def]
    tensors = _mixed()
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, ref, metadata=metadata)
    res = _write(storage, "out/model.safetensors", tensors, metadata)
    assert storage.read_bytes("out/model.safetensors") == ref.read_bytes()
    assert res.size == ref.stat().st_size


def test_writer_metadata_with_many_keys_is_sorted_and_loads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from infra.storage import LocalStorage

    store = LocalStorage(tmp_path)
    tensors = _mixed()
    _write(store, "m.safetensors", tensors, {"z": "1", "a": "2", "format": "pt"})
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        assert f.metadata() == {"z": "1", "a": "2", "format": "pt"}
        for name, t in tensors.items():
            assert torch.equal(_bits(f.get_tensor(name)), _bits(t))
    # Same bytes as save_file up to the header JSON (metadata key order is random there).
    ref = save(tensors, metadata={"z": "1", "a": "2", "format": "pt"})
    ours = (tmp_path / "m.safetensors").read_bytes()
    assert len(ours) == len(ref) and ours[-1000:] == ref[-1000:]


def test_writer_enforces_order_spec_and_completeness(storage: Storage) -> None:
    t = {"a": torch.zeros(2), "b": torch.zeros(3, dtype=torch.int8)}
    specs = [TensorSpec.of(n, x) for n, x in t.items()]
    w = open_safetensors_writer(storage, "x.safetensors", specs)
    with pytest.raises(TensorSpecError, match=r"tensor 'b' written out of order; expected 'a' next"):
        w.write("b", t["b"])
    with pytest.raises(TensorSpecError, match=r"tensor 'a' is F32\[3\], declared F32\[2\]"):
        w.write("a", torch.zeros(3))
    with pytest.raises(TensorSpecError, match=r"tensor 'a' is BF16\[2\], declared F32\[2\]"):
        w.write("a", torch.zeros(2, dtype=torch.bfloat16))
    w.write("a", t["a"])
    with pytest.raises(TensorSpecError, match=r"closed before writing tensors \['b'\]"):
        w.close()
    assert not storage.exists("x.safetensors")
    with pytest.raises(TensorSpecError, match="declared twice"):
        open_safetensors_writer(storage, "y.safetensors", specs + specs[:1])


def test_writer_exception_leaves_nothing(storage: Storage) -> None:
    t = {"a": torch.zeros(2), "b": torch.zeros(3)}
    specs = [TensorSpec.of(n, x) for n, x in t.items()]
    with pytest.raises(RuntimeError), open_safetensors_writer(storage, "z.safetensors", specs) as w:
        w.write("a", t["a"])
        raise RuntimeError("quantizer failed")
    assert not storage.exists("z.safetensors")


def test_reader_returns_exact_tensors_and_row_ranges(storage: Storage) -> None:
    tensors = _mixed()
    g = torch.Generator().manual_seed(1)
    tensors["big"] = torch.randn(300, 1000, generator=g)  # 1.2 MB: several 256 KiB chunks
    _write(storage, "m.safetensors", tensors)
    header = read_header(storage, "m.safetensors")
    with TensorReader(storage, max_concurrent_reads=3, chunk_bytes=256 * 1024) as reader:
        for name, t in tensors.items():
            got = reader.read("m.safetensors", header.tensor(name))
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(_bits(got), _bits(t)), name
        got = reader.read("m.safetensors", header.tensor("big"), rows=(17, 290))
        assert torch.equal(got, tensors["big"][17:290])
        w = header.tensor("model.layers.0.mlp.weight")
        assert torch.equal(reader.read("m.safetensors", w, rows=(5, 6)), tensors[w.name][5:6])
        assert reader.read("m.safetensors", w, rows=(3, 3)).shape == (0, 48)
        with pytest.raises(Exception, match=r"rows \[0, 65\) are outside \[0, 64\)"):
            reader.read("m.safetensors", w, rows=(0, 65))
        with pytest.raises(Exception, match="is a scalar"):
            reader.read("m.safetensors", header.tensor("scalar"), rows=(0, 1))


def _sharded(storage: Storage, prefix: str) -> dict[str, torch.Tensor]:
    t = _mixed()
    names = sorted(t)
    shards = {"model-00001-of-00002.safetensors": names[:4], "model-00002-of-00002.safetensors": names[4:]}
    weight_map = {}
    for file_name, members in shards.items():
        storage.put_bytes(f"{prefix}/{file_name}", save({n: t[n] for n in members}))
        weight_map.update({n: file_name for n in members})
    index = {"metadata": {"total_size": 1}, "weight_map": weight_map}
    storage.put_bytes(f"{prefix}/model.safetensors.index.json", json.dumps(index).encode())
    for side in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        storage.put_bytes(f"{prefix}/{side}", b"{}")
    storage.put_bytes(f"{prefix}/consolidated.safetensors", b"junk not in the index")
    storage.put_bytes(f"{prefix}/.cache/x", b"hidden")
    return t


def test_catalog_from_index(storage: Storage) -> None:
    t = _sharded(storage, "ckpt")
    cat = build_catalog(storage, "ckpt")
    assert set(cat.tensors) == set(t)
    assert cat.tensors["empty"].file == "ckpt/model-00001-of-00002.safetensors"
    assert cat.side_files == (
        "ckpt/config.json",
        "ckpt/generation_config.json",
        "ckpt/tokenizer.json",
        "ckpt/tokenizer_config.json",
    )
    assert cat.total_bytes == sum(x.numel() * x.element_size() for x in t.values())
    assert cat.unlisted_files == ("ckpt/consolidated.safetensors",)  # never read: it is junk
    with TensorReader(storage) as r:
        e = cat.tensors["model.layers.0.mlp.weight_scale"]
        assert torch.equal(_bits(r.read(e.file, e.info)), _bits(t[e.info.name]))


def test_catalog_cross_checks(storage: Storage) -> None:
    t = _sharded(storage, "c")
    index = json.loads(storage.read_bytes("c/model.safetensors.index.json"))
    index["weight_map"]["ghost"] = "model-00003-of-00003.safetensors"
    storage.put_bytes("c/model.safetensors.index.json", json.dumps(index).encode())
    with pytest.raises(
        MissingShardError, match=r"names shard 'model-00003-of-00003.safetensors', which is missing"
    ):
        build_catalog(storage, "c")
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    storage.put_bytes("c/model.safetensors.index.json", json.dumps(index).encode())
    with pytest.raises(
        CatalogError,
        match=r"tensor 'ghost' is mapped to 'model-00001-of-00002.safetensors', which does not contain it",
    ):
        build_catalog(storage, "c")
    # No index: every *.safetensors counts, so a tensor in two files is refused.
    storage.delete("c/model.safetensors.index.json")
    storage.put_bytes("c/consolidated.safetensors", save({"empty": t["empty"]}))
    with pytest.raises(
        CatalogError,
        match=r"model-00001-of-00002.safetensors: tensor 'empty' is also in 'c/consolidated.safetensors'",
    ):
        build_catalog(storage, "c")


def test_catalog_without_an_index_wants_every_numbered_shard(storage: Storage) -> None:
    # transformers numbers the shards it writes (-00001-of-00004): with no index (it often lands
    # last in an upload), a missing number is a checkpoint that is not all there yet.
    for part in (1, 2, 4):
        storage.put_bytes(f"m/model-{part:05d}-of-00004.safetensors",
                          save({f"layer.{part}.weight": torch.zeros(2, 2)}))
    with pytest.raises(MissingShardError) as missing:
        build_catalog(storage, "m")
    assert str(missing.value) == (
        f"{storage.uri('m')}: 1 of 4 shards are missing (model-00003-of-00004.safetensors), and there is "
        "no model.safetensors.index.json: the checkpoint is incomplete (still uploading, or copied in part)")
    storage.put_bytes("m/model-00003-of-00004.safetensors", save({"layer.3.weight": torch.zeros(2, 2)}))
    assert len(build_catalog(storage, "m").tensors) == 4
    # Names that number nothing (or another count, written by hand) are read as they are.
    storage.put_bytes("n/weights-1-of-9.safetensors", save({"a": torch.zeros(2)}))
    storage.put_bytes("n/extra.safetensors", save({"b": torch.zeros(2)}))
    shown = "weights-2-of-9.safetensors, weights-3-of-9.safetensors, weights-4-of-9.safetensors and 5 more"
    with pytest.raises(MissingShardError, match=rf": 8 of 9 shards are missing \({shown}\)"):
        build_catalog(storage, "n")
    storage.delete("n/weights-1-of-9.safetensors")
    assert set(build_catalog(storage, "n").tensors) == {"b"}
    # DeepSeek-V3's parts are five digits of a six-digit count.
    storage.put_bytes("d/model-00002-of-000002.safetensors", save({"c": torch.zeros(2)}))
    with pytest.raises(MissingShardError, match=r": 1 of 2 shards are missing \(model-00001-of-000002\."):
        build_catalog(storage, "d")


def test_catalog_refuses_pickle_only(storage: Storage) -> None:
    storage.put_bytes("p/pytorch_model.bin", b"\x80\x04 pickle bytes never loaded")
    storage.put_bytes("p/config.json", b"{}")
    with pytest.raises(
        PickleWeightsError,
        match=r"only pickle weights found \(pytorch_model.bin\).*Convert them to safetensors first",
    ):
        build_catalog(storage, "p")
    with pytest.raises(CatalogError, match=r"nothing-here: nothing there \(no such folder, or an empty one"):
        build_catalog(storage, "nothing-here")
    storage.put_bytes("config-only/config.json", b"{}")
    with pytest.raises(CatalogError, match=r"config-only: no \*.safetensors files and no model.safetensors"):
        build_catalog(storage, "config-only")


def refusal(storage: Storage, prefix: str) -> str:
    with pytest.raises(CatalogError) as refused:
        build_catalog(storage, prefix)
    return str(refused.value)


def test_catalog_of_a_folder_above_the_checkpoint_names_where_it_is(storage: Storage) -> None:
    """A folder holding the checkpoint in a folder below it was reported as 'nothing there'."""
    weights = save({"w": torch.zeros(2, 2)})
    # A Hugging Face cache's repository folder: the files are under snapshots/<revision>.
    storage.put_bytes("hub/models--org--m/blobs/0a1b", weights)
    for revision in ("aaa111", "bbb222"):
        storage.put_bytes(f"hub/models--org--m/snapshots/{revision}/model.safetensors", weights)
    cache = storage.uri("hub/models--org--m")
    snapshots = f"{cache}/snapshots"
    assert refusal(storage, "hub/models--org--m") == (
        f"{cache}: a Hugging Face cache folder (blobs, refs, snapshots), not a checkpoint: name one of "
        f"its snapshots: {snapshots}/aaa111, {snapshots}/bbb222")
    storage.put_bytes("hub/models--org--m/refs/main", b"bbb222")
    chosen = refusal(storage, "hub/models--org--m")
    assert chosen.endswith(f"name {snapshots}/bbb222 (the revision refs/main names)")
    # Any other folder of folders: the folders holding weights are named, hidden ones never.
    storage.put_bytes("repo/.staging/model.safetensors", weights)
    storage.put_bytes("repo/transformer/model.safetensors", weights)
    storage.put_bytes("repo/notes/readme.txt", b"hi")
    repo = storage.uri("repo")
    assert refusal(storage, "repo") == (
        f"{repo}: no files at its top level, only folders; *.safetensors files are in "
        f"{repo}/transformer: name the folder that holds the checkpoint")
    storage.put_bytes("repo/model_index.json", b"{}")
    assert refusal(storage, "repo") == (
        f"{repo}: no *.safetensors files and no model.safetensors.index.json; *.safetensors files are "
        f"in {repo}/transformer: name the folder that holds the checkpoint")
    storage.put_bytes("docs/a/readme.txt", b"hi")
    assert refusal(storage, "docs").endswith(
        "docs: no files at its top level, only folders (a), and no *.safetensors files in them")
