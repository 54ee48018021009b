"""Data at scale: Parquet files and WebDataset-style tar shards, read in streamed batches.

Parquet: one column per model input (and optionally a `label` column); each row is one sample.
A column may hold
  - numbers (one value per sample),
  - fixed-size lists, nested for more axes (`fixed_size_list<fixed_size_list<float, 28>, 28>`),
  - lists whose rows all have the same length (what pandas writes for a column of arrays),
  - tensors: Arrow's `fixed_shape_tensor` or Ray Data's tensor columns (`ray.data.arrow_tensor*`,
    also when read back without Ray),
  - binary cells each holding one serialized `.npy` array (`np.save` into bytes).
Flat lists take the per-sample shape from the field metadata key `shape` (JSON, e.g. `[1, 28, 28]`)
when present. pyarrow reads one record batch at a time (never the whole file), imported only when
a Parquet file is read; without it the error names the `parquet` extra.

Tar: members `<key>.<input name>.npy` (WebDataset's convention: the key is the member's path up to
the first dot of its file name), one sample per key without a batch axis, members of one sample
adjacent. The tar is read as a stream (gzip too); members other than `.npy` are skipped.

Nothing is unpickled; a shard that cannot be read gives one `InputError` naming it.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from onnxprune.errors import InputError

Batch = dict[str, np.ndarray]
PARQUET_SUFFIXES = (".parquet", ".pq")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
RAY_TENSOR_TYPES = (b"ray.data.arrow_tensor", b"ray.data.arrow_tensor_v2", b"ray.data.arrow_variable_shaped_tensor")


def shard_kind(path: Path) -> str | None:
    """'parquet', 'tar' or None, from the file name."""
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    return None


def shard_batches(path: Path, batch_size: int, wanted: set[str]) -> Iterator[Batch]:
    """Batches of exactly `batch_size` rows (the last may be shorter) from one Parquet or tar shard.
    `wanted` empty means every column / field."""
    reader = _parquet_pieces if shard_kind(path) == "parquet" else _tar_pieces
    yield from rebatch(reader(path, batch_size, wanted), batch_size, str(path))


def parquet_rows(path: Path) -> int:
    """Number of rows from the Parquet footer, without reading data."""
    pq = _pyarrow_parquet()
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a damaged footer
        raise InputError(f"{path}: not a readable Parquet shard ({_first_line(exc)})") from None


def rebatch(pieces: Iterable[Batch], batch_size: int, where: str) -> Iterator[Batch]:
    """Regroup row blocks of any size into blocks of `batch_size` rows; memory: one batch."""
    held: list[Batch] = []
    rows = 0
    for piece in pieces:
        if not piece:
            continue
        if held and set(piece) != set(held[0]):
            raise InputError(f"{where}: samples have different fields ({sorted(held[0])} vs {sorted(piece)})")
        held.append(piece)
        rows += len(next(iter(piece.values())))
        while rows >= batch_size:
            joined = _concat(held, where)
            yield {k: v[:batch_size] for k, v in joined.items()}
            rest = {k: v[batch_size:] for k, v in joined.items()}
            rows -= batch_size
            held = [rest] if rows else []
    if rows:
        yield _concat(held, where)


def _concat(pieces: list[Batch], where: str) -> Batch:
    if len(pieces) == 1:
        return pieces[0]
    try:
        return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
    except ValueError as exc:
        raise InputError(f"{where}: samples have different shapes ({exc})") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]


# --- Parquet ----------------------------------------------------------------------------------

def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("Parquet data needs pyarrow: pip install 'onnxprune[parquet]'") from None
    return pq


def _parquet_pieces(path: Path, batch_size: int, wanted: set[str]) -> Iterator[Batch]:
    pq = _pyarrow_parquet()
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
        columns = [n for n in schema.names if not wanted or n in wanted]
        if not columns:
            raise InputError(f"{path}: no column named {', '.join(sorted(wanted))} (columns: {', '.join(schema.names)})")
        for record in pf.iter_batches(batch_size=batch_size, columns=columns):
            yield {name: _column_array(record.column(name), schema.field(name), f"{path}[{name}]")
                   for name in columns}
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet shard ({_first_line(exc)})") from None


def _column_array(column, field, where: str) -> np.ndarray:
    """One Parquet column of n rows as an array [n, *sample shape]."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if column.null_count:
        raise InputError(f"{where}: column has null values")
    n = len(column)
    shape = _declared_shape(field)
    if isinstance(column.type, pa.BaseExtensionType):
        shape = tuple(getattr(column.type, "shape", None) or ()) or shape
        column = column.storage
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return _npy_cells(column, where)
    dims = []
    while pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or \
            pa.types.is_fixed_size_list(column.type):
        if pa.types.is_fixed_size_list(column.type):
            dims.append(column.type.list_size)
        else:
            lengths = np.unique(pc.list_value_length(column).to_numpy(zero_copy_only=False))
            if len(lengths) > 1:
                raise InputError(f"{where}: rows hold lists of different lengths {lengths[:5].tolist()}")
            dims.append(int(lengths[0]) if len(lengths) else 0)
        column = column.flatten()
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type)):
        raise InputError(f"{where}: unsupported column type {column.type} (numbers, lists, tensors or .npy bytes)")
    values = column.to_numpy(zero_copy_only=False)
    if shape is not None:
        if int(np.prod(shape)) * n != values.size:
            raise InputError(f"{where}: declared shape {list(shape)} does not fit {values.size // max(n, 1)} values")
        return values.reshape((n, *shape))
    return values.reshape((n, *dims))


def _declared_shape(field) -> tuple[int, ...] | None:
    """Per-sample shape from field metadata: our `shape` key, or Ray Data's tensor extension."""
    meta = field.metadata or {}
    text = meta.get(b"shape")
    if text is None and meta.get(b"ARROW:extension:name") in RAY_TENSOR_TYPES:
        text = meta.get(b"ARROW:extension:metadata")
    if text is None:
        return None
    try:
        shape = json.loads(text)
        return tuple(int(d) for d in shape) if isinstance(shape, list) else None
    except (ValueError, TypeError):
        return None


def _npy_cells(column, where: str) -> np.ndarray:
    arrays = [_load_npy(cell.as_py(), where) for cell in column]
    try:
        return np.stack(arrays) if arrays else np.zeros((0,), np.float32)
    except ValueError as exc:
        raise InputError(f"{where}: .npy cells have different shapes ({exc})") from None


def _load_npy(raw: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{where}: not a .npy array ({_first_line(exc)})") from None


# --- tar (WebDataset layout) ------------------------------------------------------------------

def _tar_pieces(path: Path, batch_size: int, wanted: set[str]) -> Iterator[Batch]:
    """One single-sample batch per key, in archive order."""
    key, sample, found = None, {}, False
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile() or not member.name.endswith(".npy"):
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, dot, field = base.partition(".")
                name = field[:-4]
                if not dot or not name or (wanted and name not in wanted):
                    continue
                this = f"{folder}/{stem}" if folder else stem
                if this != key and sample:
                    yield _one_sample(sample)
                    sample = {}
                key, found = this, True
                where = f"{path}[{member.name}]"
                sample[name] = _load_npy(tar.extractfile(member).read(), where)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InputError(f"{path}: not a readable tar shard ({_first_line(exc)})") from None
    if sample:
        yield _one_sample(sample)
    if not found:
        raise InputError(f"{path}: no member <key>.<name>.npy for {', '.join(sorted(wanted)) or 'any input'}")


def _one_sample(sample: Batch) -> Batch:
    return {k: v[None] for k, v in sample.items()}


# --- writing (for tests, benchmarks and users converting .npz) -------------------------------

def write_parquet(arrays: Batch, path: "str | Path", rows_per_group: int = 1024) -> None:
    """`{name: array [n, ...]}` as a Parquet file: numbers stay plain columns, more axes become
    nested fixed-size lists (the per-sample shape travels in the type)."""
    pq = _pyarrow_parquet()
    import pyarrow as pa

    columns = {}
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        column = pa.array(array.reshape(-1))
        for size in reversed(array.shape[1:]):
            column = pa.FixedSizeListArray.from_arrays(column, size)
        columns[name] = column
    _atomic(Path(path), lambda tmp: pq.write_table(pa.table(columns), tmp, row_group_size=rows_per_group))


def write_tar(arrays: Batch, path: "str | Path", prefix: str = "sample") -> None:
    """`{name: array [n, ...]}` as a WebDataset-style tar: members `<prefix><i>.<name>.npy`."""
    def write(tmp: Path) -> None:
        n = len(next(iter(arrays.values())))
        with tarfile.open(tmp, "w") as tar:
            for i in range(n):
                for name, array in arrays.items():
                    buffer = io.BytesIO()
                    np.save(buffer, np.asarray(array[i]), allow_pickle=False)
                    info = tarfile.TarInfo(f"{prefix}{i:08d}.{name}.npy")
                    info.size = buffer.tell()
                    buffer.seek(0)
                    tar.addfile(info, buffer)

    _atomic(Path(path), write)


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".partial")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
