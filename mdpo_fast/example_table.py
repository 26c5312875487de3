"""Prepared examples in one memory-mapped Arrow file: the preparation cache, and what training reads.

Preparation streams examples into the file batch by batch; an example is rebuilt on access from the
mapped columns. So neither preparation nor training holds per-record objects (83k examples cost the
pages of the file, shared with every loader worker, not a Python list each worker copies), and
pickling the table for a spawned worker sends its path only.
"""

from __future__ import annotations

import functools
import os
import pickle
import socket
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mdpo_fast.examples import Example

_IDS = ("prompt_ids", "chosen_ids", "rejected_ids")
_TEXTS = ("prompt_text", "chosen_text", "rejected_text")
BATCH = 1024  # examples per record batch: what preparation holds at a time


class TableWriter:
    """Writes examples to `path` as they come (`add`); `close()` makes the file appear whole under `path` (a
    killed run leaves none) and returns it mapped. Every example's token ids must share one array type."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_suffix(f".{socket.gethostname()}.{os.getpid()}.tmp")  # ranks on shared storage
        self.pending: list[tuple[Example, bool]] = []
        self.writer = None
        self.count = 0

    def add(self, example: Example, truncated: bool = False) -> None:
        self.pending.append((example, truncated))
        self.count += 1
        if len(self.pending) == BATCH:
            self._flush()

    def _flush(self) -> None:
        batch = _record_batch(self.pending)
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pa.ipc.new_file(str(self.tmp), batch.schema)
        self.writer.write_batch(batch)
        self.pending = []

    def close(self, path: Path | None = None) -> ExampleTable:
        """The file, complete, under `path` (default: the writer's own), mapped."""
        if self.pending or self.writer is None:
            self._flush()
        self.writer.close()
        os.replace(self.tmp, path or self.path)
        return ExampleTable(path or self.path)

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.tmp.unlink(missing_ok=True)


def _record_batch(items: list[tuple[Example, bool]]) -> pa.RecordBatch:
    code = items[0][0].prompt_ids.typecode if items else "H"
    columns = {
        "index": pa.array([ex.index for ex, _ in items], pa.int64()),
        "truncated": pa.array([t for _, t in items], pa.bool_()),
        "image": pa.array([pickle.dumps(ex.image, protocol=pickle.HIGHEST_PROTOCOL) for ex, _ in items],
                          pa.large_binary()),
    }
    for name in _IDS:
        parts = [getattr(ex, name) for ex, _ in items]
        if any(p.typecode != code for p in parts):
            raise ValueError("token ids of one table must share one array type")
        offsets = np.zeros(len(parts) + 1, np.int64)
        np.cumsum([len(p) for p in parts], out=offsets[1:])
        values = np.frombuffer(b"".join(p.tobytes() for p in parts), np.dtype(code))
        columns[name] = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))
    for name in _TEXTS:
        columns[name] = pa.array([getattr(ex, name) for ex, _ in items], pa.large_string())
    return pa.RecordBatch.from_pydict(columns, metadata={"typecode": code})


class ExampleTable(Sequence):
    """The examples of one file written by `TableWriter`, memory-mapped."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        reader = pa.ipc.open_file(pa.memory_map(str(self.path)))
        self._batches = [reader.get_batch(k) for k in range(reader.num_record_batches)]  # views into the map
        self._code = reader.schema.metadata[b"typecode"].decode()
        self._starts = np.cumsum([0] + [b.num_rows for b in self._batches])
        self.indices = np.concatenate([b.column("index").to_numpy() for b in self._batches])  # ascending
        self._ids = [{name: (b.column(name).offsets.to_numpy(), b.column(name).values.to_numpy())
                      for name in _IDS} for b in self._batches]

    def __len__(self) -> int:
        return int(self._starts[-1])

    # Counted when asked (by preparation's report), not at every open: each loader worker opens the table too.
    @functools.cached_property
    def n_truncated(self) -> int:
        return int(sum(pc.sum(b.column("truncated")).as_py() or 0 for b in self._batches))

    @functools.cached_property
    def n_same_answers(self) -> int:
        """Examples whose chosen and rejected answers render the same."""
        return int(sum(pc.sum(pc.equal(b.column("chosen_text"), b.column("rejected_text"))).as_py() or 0
                       for b in self._batches))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # negative indices, bounds
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        j, batch, ids = i - int(self._starts[k]), self._batches[k], self._ids[k]
        token_ids = [array(self._code, ids[name][1][ids[name][0][j]:ids[name][0][j + 1]].tobytes()) for name in _IDS]
        texts = [batch.column(name)[j].as_py() for name in _TEXTS]
        image = pickle.loads(batch.column("image")[j].as_py())
        return Example(int(self.indices[i]), image, *token_ids, *texts)

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))

    def __reduce__(self):  # a spawned loader worker maps the same file
        return ExampleTable, (self.path,)
