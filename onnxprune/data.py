"""Calibration and verification data in every accepted form, streamed batch by batch.

Forms: one `.npz` (keys = input names, leading batch axis), Parquet files and WebDataset-style tar
shards (`onnxprune.shards`), a directory or a list of such files, ONNX `test_data_set_*` folders of
TensorProto `.pb` files, `name:file.npy` pairs, and in Python a `{name: array}` dict, any iterable of
such dicts, or an object with `get_next()` (ONNX Runtime's `CalibrationDataReader`). Arrays are read a batch of rows at a time (npz members are decoded from the
zip stream, `.npy` files memory-mapped), so memory does not grow with the number of samples. Nothing
is ever unpickled.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import onnx

from onnxprune.errors import InputError
from onnxprune.shards import parquet_rows, shard_batches, shard_kind

Batch = dict[str, np.ndarray]
DEFAULT_BATCH = 32

DataSource = Any
"""A path, a list of `name:file.npy` strings, a dict, an iterable of dicts, or a reader."""


def model_inputs(model: onnx.ModelProto) -> list[str]:
    """Names of the graph inputs that are fed at run time (not initializers)."""
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def batch_size_for(model: onnx.ModelProto, default: int = DEFAULT_BATCH) -> int:
    """The batch a model accepts: its fixed leading dimension where all inputs fix one, else `default`."""
    inits = {t.name for t in model.graph.initializer}
    fixed = set()
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if vi.name in inits or not dims:
            continue
        fixed.add(dims[0].dim_value if dims[0].HasField("dim_value") else None)
    return fixed.pop() or default if len(fixed) == 1 else default


def iter_batches(data: DataSource, names: list[str], batch_size: int = DEFAULT_BATCH,
                 extra: tuple[str, ...] = (), limit: int | None = None) -> Iterator[Batch]:
    """Yield `{name: array}` batches holding every name in `names` plus any of `extra` present.

    `limit` caps the number of samples (leading rows) yielded.
    """
    seen = 0
    wanted = set(names) | set(extra)
    for batch in _raw_batches(data, batch_size, wanted):
        missing = [n for n in names if n not in batch]
        if missing:
            raise InputError(f"{_describe(data)}: no data for model input(s) {', '.join(sorted(missing))}")
        batch = {k: v for k, v in batch.items() if k in wanted}
        if limit is not None:
            rows = _rows(batch)
            if seen >= limit:
                return
            if rows is not None and seen + rows > limit:
                batch = {k: v[:limit - seen] for k, v in batch.items()}
            seen += rows or 1
        yield batch


def is_one_shot(data: DataSource) -> bool:
    """Whether `data` can be read only once: a reader with `get_next()` or an iterator/generator."""
    return hasattr(data, "get_next") or isinstance(data, Iterator)


def spool(data: DataSource, directory: "str | os.PathLike[str]") -> Path:
    """Copy a one-shot source batch by batch into `directory` (one .npz per batch) and return it.

    Several steps of a prune read the data (statistics, sequential re-fit, sensitivity,
    verification, static quantization); a generator or reader would be empty after the first.
    The directory form re-reads from disk, so memory still does not grow with the samples.
    """
    directory = Path(directory)
    written = 0
    for batch in _raw_batches(data, DEFAULT_BATCH, set()):
        with zipfile.ZipFile(directory / f"batch_{written:08d}.npz", "w") as zf:  # np.savez would clash on
            for name, array in batch.items():  # an input named "file"
                with zf.open(name + ".npy", "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.ascontiguousarray(array), allow_pickle=False)
        written += 1
    if not written:
        raise InputError("data: no input data (the generator or reader yielded nothing)")
    return directory


def count_samples(data: DataSource, names: list[str]) -> int | None:
    """Number of samples without reading the arrays, where the form allows it (for progress bars)."""
    if isinstance(data, dict):
        return _rows(data)
    if not isinstance(data, (str, os.PathLike)) or not Path(data).is_file():
        return None
    if shard_kind(Path(data)) == "parquet":
        return parquet_rows(Path(data))
    if str(data).endswith(".npz"):
        with zipfile.ZipFile(data) as zf:
            shapes = [_npy_header(zf, n + ".npy")[0] for n in names if n + ".npy" in zf.namelist()]
        return shapes[0][0] if shapes and shapes[0] else None
    return None


def _rows(batch: Batch) -> int | None:
    for value in batch.values():
        return int(value.shape[0]) if np.ndim(value) else None
    return None


def _describe(data: DataSource) -> str:
    if isinstance(data, (str, os.PathLike)):
        return str(data)
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], str):
        return " ".join(data)
    return "data"


def _raw_batches(data: DataSource, batch_size: int, wanted: set[str]) -> Iterator[Batch]:
    if isinstance(data, dict):  # one array per input, leading batch axis: batched like an .npz
        arrays = {k: np.asarray(v) for k, v in data.items()}
        if len({a.shape[0] if a.ndim else None for a in arrays.values()}) == 1 and all(a.ndim for a in arrays.values()):
            yield from _slice_rows(arrays, batch_size, "data")
        else:
            yield arrays
    elif isinstance(data, (list, tuple)) and data and all(isinstance(s, (str, os.PathLike)) for s in data):
        if len(data) == 1 and ":" not in _pair_name(data[0]):
            yield from _raw_batches(data[0], batch_size, wanted)
        elif all(Path(s).is_file() for s in data):  # shards, e.g. a shell glob
            for path in data:
                yield from _path_batches(str(path), batch_size, wanted)
        else:
            yield from _npy_pairs([str(s) for s in data], batch_size)
    elif isinstance(data, (str, os.PathLike)):
        yield from _path_batches(str(data), batch_size, wanted)
    elif hasattr(data, "get_next"):
        while (item := data.get_next()) is not None:
            yield _as_batch(item)
    elif isinstance(data, Iterable):
        for item in data:
            yield _as_batch(item)
    else:
        raise InputError(f"unsupported data of type {type(data).__name__}")


def _pair_name(spec) -> str:
    text = str(spec)
    return text if not Path(text).exists() else ""


def _as_batch(item) -> Batch:
    if not isinstance(item, dict):
        raise InputError(f"data items must be {{input name: array}} dicts, got {type(item).__name__}")
    return {k: np.asarray(v) for k, v in item.items()}


def _path_batches(text: str, batch_size: int, wanted: set[str]) -> Iterator[Batch]:
    if ":" in text and not Path(text).exists():
        yield from _npy_pairs([text], batch_size)
        return
    path = Path(text)
    if path.is_dir():
        yield from _dir_batches(path, batch_size, wanted)
    elif path.is_file() and path.suffix == ".npz":
        yield from _npz_batches(path, batch_size, wanted)
    elif path.is_file() and shard_kind(path):
        yield from shard_batches(path, batch_size, wanted)
    elif path.is_file():
        raise InputError(f"{path}: data must be .npz, .parquet, .tar, a directory, a test_data_set folder "
                         "or name:file.npy")
    else:
        raise InputError(f"{path}: data not found")


def _dir_batches(path: Path, batch_size: int, wanted: set[str]) -> Iterator[Batch]:
    if list(path.glob("input_*.pb")):
        yield _pb_set(path)
        return
    sets = sorted(p for p in path.glob("test_data_set_*") if p.is_dir())
    if sets:
        for folder in sets:
            yield _pb_set(folder)
        return
    files = data_files(path)
    if not files:
        raise InputError(f"{path}: directory holds no .npz, .parquet or .tar files or test_data_set_* folders")
    for file in files:
        yield from _path_batches(str(file), batch_size, wanted)


def data_files(directory: Path) -> list[Path]:
    """The data files of a directory in name order: .npz, Parquet and tar shards."""
    return sorted(p for p in directory.iterdir() if p.is_file() and (p.suffix == ".npz" or shard_kind(p)))


def _pb_set(folder: Path) -> Batch:
    """One ONNX test_data_set folder: input_<k>.pb TensorProtos, named by the tensors' own names."""
    batch = {}
    for file in sorted(folder.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[-1])):
        tensor = onnx.TensorProto()
        try:
            tensor.ParseFromString(file.read_bytes())
        except Exception as exc:  # protobuf's DecodeError
            raise InputError(f"{file}: not a TensorProto ({exc})") from None
        if not tensor.name:
            raise InputError(f"{file}: TensorProto has no name (needed to match a model input)")
        batch[tensor.name] = onnx.numpy_helper.to_array(tensor)
    return batch


def _npy_pairs(specs: list[str], batch_size: int) -> Iterator[Batch]:
    arrays = {}
    for spec in specs:
        name, sep, file = spec.partition(":")
        if not sep or not name or not file:
            raise InputError(f"data {spec!r}: expected name:file.npy")
        try:
            arrays[name] = np.load(file, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"{file}: cannot read array ({exc})") from None
    yield from _slice_rows(arrays, batch_size, " ".join(specs))


def _slice_rows(arrays: dict[str, np.ndarray], batch_size: int, where: str) -> Iterator[Batch]:
    lengths = {a.shape[0] if a.ndim else 1 for a in arrays.values()}
    if len(lengths) > 1:
        raise InputError(f"{where}: arrays have different numbers of samples {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    for start in range(0, n, batch_size):
        yield {k: np.array(a[start:start + batch_size]) for k, a in arrays.items()}


def _npy_header(zf: zipfile.ZipFile, member: str):
    with zf.open(member) as fh:
        return _read_header(fh)


def _read_header(fh):
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    return np.lib.format.read_array_header_2_0(fh)


def _npz_batches(path: Path, batch_size: int, wanted: set[str]) -> Iterator[Batch]:
    """Decode each wanted npz member row block by row block from the zip stream."""
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: cannot read input data ({exc})") from None
    with zf:
        members = {m[:-4]: m for m in zf.namelist() if m.endswith(".npy") and m[:-4] in wanted}
        readers = {}
        try:
            for name, member in members.items():
                readers[name] = _RowReader(zf.open(member), f"{path}[{name}]")
            lengths = {r.rows for r in readers.values()}
            if len(lengths) > 1:
                raise InputError(f"{path}: arrays have different numbers of samples {sorted(lengths)}")
            n = lengths.pop() if lengths else 0
            if not readers:
                yield {}
                return
            for start in range(0, n, batch_size):
                yield {k: r.read(min(batch_size, n - start)) for k, r in readers.items()}
        finally:
            for reader in readers.values():
                reader.close()


class _RowReader:
    """Reads leading-axis rows of one .npy stream without loading the rest."""

    def __init__(self, fh, where: str) -> None:
        self.fh = fh
        try:
            shape, fortran, dtype = _read_header(fh)
        except ValueError as exc:
            raise InputError(f"{where}: not a numpy array ({exc})") from None
        if dtype.hasobject:
            raise InputError(f"{where}: object arrays are refused (they would need unpickling)")
        if fortran and len(shape) > 1:
            raise InputError(f"{where}: Fortran-ordered arrays are not supported; save with np.savez")
        self.shape, self.dtype = (shape or (1,)), dtype
        self.rows = self.shape[0]
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * dtype.itemsize

    def read(self, count: int) -> np.ndarray:
        raw = self.fh.read(count * self.row_bytes)
        return np.frombuffer(raw, dtype=self.dtype).reshape((count,) + tuple(self.shape[1:])).copy()

    def close(self) -> None:
        self.fh.close()
