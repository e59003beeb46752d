"""Datasets for the training stages: loading, pretraining packing with document boundaries, SFT batches.

Loading (`load_records`) goes through `datasets`: local json/jsonl/parquet/txt/csv files (a file, a
directory of them, or a glob) and hub dataset names (`streaming=True` for large corpora). JSONL files
are checked line by line first so a broken line is reported as `DataError("file:line: ...")`; a
missing path or an empty dataset is a `DataError` too.

Pretraining (`PackedLoader`): documents are tokenized, an EOS appended, and concatenated into rows of
`seq_len + 1` tokens (consecutive rows do not overlap: a row's last token is only a target); each row
gives `input_ids = row[:-1]`, `labels = row[1:]` and `seq_idx` (int32,
0, 1, 2, ... for each document inside the row) so the SSM state resets at document boundaries. The
label of a document's last token (which would be the next document's first token) is -100. Each row
is drawn from one source, chosen by the mixture weights with a generator seeded from (seed, row
number), so the position `state_dict()` = per-source (epoch, index, offset) + rows drawn restores the
stream exactly. `set_phase(mixture, seq_len)` switches the mixture and context length (FG-WSD phases).

SFT (`SFTLoader` + `collate_sft`): conversations rendered by `rl.train.chat`, padded on the right to the
longest sequence of the batch; labels are -100 on padding and on every non-assistant token.
"""

from __future__ import annotations

import glob as globlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.errors import ConfigError, DataError
from model.jsonl import iter_jsonl
from model.seeds import epoch_seed, index_seed, record_seed, source_seed
from rl.train.chat import encode_chat, encode_text, token_id
from rollout.chatml import IM_END

IGNORE_INDEX = -100
_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


# ----------------------------------------------------------------------------- config


@dataclass
class DataSource:
    """One corpus. `path`: local file / directory / glob, or a hub dataset name."""

    path: str
    name: str = ""                # label used in mixtures; defaults to the file stem / hub name
    weight: float = 1.0           # default mixture weight
    text_field: str = "text"      # pretraining: the text column; SFT: ignored (uses `messages`)
    split: str = "train"
    streaming: bool = False
    hub_config: str | None = None  # datasets config name for hub datasets
    max_records: int | None = None  # take only the first N records (small runs, tests)

    def __post_init__(self):
        if not self.name:
            self.name = Path(self.path).stem if not _looks_like_hub(self.path) else self.path
        if self.weight < 0:
            raise ConfigError(f"data source {self.name}: weight must be >= 0, got {self.weight}")


def _looks_like_hub(path: str) -> bool:
    p = Path(path)
    return not p.exists() and not any(c in path for c in "*?[") and path.count("/") <= 1 \
        and not path.startswith((".", "/", "~")) and p.suffix.lower() not in _FORMATS


# ----------------------------------------------------------------------------- loading


def check_jsonl(path: str | Path) -> int:
    """Parse every line of a JSONL file; return the record count; DataError names file and line."""
    return sum(1 for _ in iter_jsonl(path))


def _local_files(spec: str) -> list[Path]:
    p = Path(spec).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _FORMATS)
        if not files:
            raise DataError(f"{p}: directory has no data files ({', '.join(sorted(_FORMATS))})")
        return files
    if any(c in spec for c in "*?["):
        files = sorted(Path(f) for f in globlib.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"{spec}: no files match")
        return files
    raise DataError(f"dataset path not found: {spec}")


def load_records(source: DataSource | str, streaming: bool | None = None):
    """A `datasets.Dataset` (or `IterableDataset` when streaming) of the source's records."""
    import datasets

    src = source if isinstance(source, DataSource) else DataSource(path=source)
    stream = src.streaming if streaming is None else streaming
    if _looks_like_hub(src.path):
        try:
            ds = datasets.load_dataset(src.path, src.hub_config, split=src.split, streaming=stream)
        except Exception as e:  # network, unknown name, ...
            raise DataError(f"dataset {src.path!r} is not a local file or directory, and loading it as a hub "
                            f"dataset (split {src.split}) failed: {type(e).__name__}: {e}") from None
    else:
        files = _local_files(src.path)
        kinds = {_FORMATS.get(f.suffix.lower()) for f in files}
        if None in kinds:
            bad = next(f for f in files if f.suffix.lower() not in _FORMATS)
            raise DataError(f"{bad}: unsupported data file type (use {', '.join(sorted(_FORMATS))})")
        if len(kinds) > 1:
            raise DataError(f"{src.path}: mixes file types {sorted(kinds)}; use one source per type")
        kind = kinds.pop()
        total = 0
        for f in files:
            if f.stat().st_size == 0:
                continue
            if kind == "json" and f.suffix.lower() == ".jsonl":
                total += check_jsonl(f)
            else:
                total += 1
        if total == 0:
            raise DataError(f"empty dataset: {src.path}")
        from datasets.utils import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

        bars = is_progress_bar_enabled()
        disable_progress_bar()  # "Generating train split" for every small local file is noise
        try:
            ds = datasets.load_dataset(kind, data_files=[str(f) for f in files if f.stat().st_size],
                                       split="train", streaming=stream)
        except Exception as e:
            raise DataError(f"could not read {src.path}: {type(e).__name__}: {e}") from None
        finally:
            if bars:
                enable_progress_bar()
    if src.max_records is not None:
        ds = ds.take(src.max_records) if stream else ds.select(range(min(src.max_records, len(ds))))
    if not stream and len(ds) == 0:
        raise DataError(f"empty dataset: {src.path}")
    return ds


# ----------------------------------------------------------------------------- tokenizer adapter


def eos_id(tokenizer: Any) -> int | None:
    i = getattr(tokenizer, "eos_token_id", None)
    if i is not None:
        return int(i)
    for t in ("<|endoftext|>", "</s>", "<eos>", IM_END):
        i = token_id(tokenizer, t)
        if i is not None:
            return i
    return None


def pad_id(tokenizer: Any) -> int:
    i = getattr(tokenizer, "pad_token_id", None)
    if i is not None:
        return int(i)
    for t in ("<|pad|>", "<pad>"):
        i = token_id(tokenizer, t)
        if i is not None:
            return i
    e = eos_id(tokenizer)
    return 0 if e is None else e


# ----------------------------------------------------------------------------- index order


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """Record order of one epoch: a permutation seeded by (seed, epoch), or 0..n-1."""
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(n, generator=g).tolist()


class _Cursor:
    """Walks one source's records epoch by epoch; position (epoch, index) is exact on resume."""

    def __init__(self, ds, seed: int, shuffle: bool, name: str):
        self.ds, self.seed, self.shuffle, self.name = ds, seed, shuffle, name
        self.streaming = not hasattr(ds, "__len__")
        self.epoch, self.index = 0, 0
        self._order: list[int] | None = None
        self._iter: Iterator | None = None
        self._cur: dict | None = None

    def _ensure(self):
        if self.streaming:
            if self._iter is None:
                ds = self.ds
                if self.shuffle:
                    ds = ds.shuffle(seed=self.seed + self.epoch, buffer_size=10_000)
                self._iter = iter(ds.skip(self.index) if self.index else ds)
        elif self._order is None:
            self._order = epoch_order(len(self.ds), self.seed, self.epoch, self.shuffle)

    def peek(self) -> dict:
        """Current record (the one at `index`), moving to the next epoch at the end."""
        for _ in range(2):
            self._ensure()
            if self.streaming:
                if self._cur is None:
                    try:
                        self._cur = next(self._iter)
                    except StopIteration:
                        if self.index == 0:
                            raise DataError(f"empty dataset: {self.name}") from None
                        self._next_epoch()
                        continue
                return self._cur
            if self.index < len(self._order):
                return self.ds[self._order[self.index]]
            self._next_epoch()
        raise DataError(f"empty dataset: {self.name}")

    def advance(self) -> None:
        self.index += 1
        if self.streaming:
            self._cur = None

    def _next_epoch(self) -> None:
        self.epoch, self.index = self.epoch + 1, 0
        self._order, self._iter, self._cur = None, None, None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.index = int(s["epoch"]), int(s["index"])
        self._order, self._iter, self._cur = None, None, None


# ----------------------------------------------------------------------------- pretraining


@dataclass
class PackedBatch:
    input_ids: Tensor   # [B, T] int64
    labels: Tensor      # [B, T] int64, -100 where the target crosses a document boundary
    seq_idx: Tensor     # [B, T] int32, document index inside each row (0, 1, ...)

    @property
    def n_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device) -> PackedBatch:
        return PackedBatch(self.input_ids.to(device), self.labels.to(device), self.seq_idx.to(device))


def pack_documents(docs: Sequence[list[int]], seq_len: int, eos: int | None = None) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Pure packing of token lists into (input_ids [T], labels [T], seq_idx [T]) rows (drops the tail)."""
    toks: list[int] = []
    doc: list[int] = []
    for d, ids in enumerate(docs):
        ids = list(ids) + ([eos] if eos is not None else [])
        toks += ids
        doc += [d] * len(ids)
    rows = []
    for s in range(0, len(toks) - seq_len, seq_len):
        rows.append(_make_row(toks[s:s + seq_len + 1], doc[s:s + seq_len + 1]))
    return rows


def _make_row(toks: list[int], docs: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    t = torch.tensor(toks, dtype=torch.long)
    d = torch.tensor(docs, dtype=torch.long)
    d = torch.cat([torch.zeros(1, dtype=torch.long), (d[1:] != d[:-1]).long()]).cumsum(0)
    labels = t[1:].clone()
    labels[d[1:] != d[:-1]] = IGNORE_INDEX
    return t[:-1], labels, d[:-1].to(torch.int32)


class PackedLoader:
    """Infinite stream of packed pretraining batches from weighted sources, exactly resumable.

    sources: list of (DataSource, dataset) pairs (see `load_records`). tokenizer: HF or `tokenizers`
    tokenizer. seq_len: tokens per row (the model sees seq_len inputs). mixture: name -> weight
    (defaults to each source's weight).
    """

    def __init__(self, sources: list[tuple[DataSource, Any]], tokenizer: Any, seq_len: int, batch_size: int,
                 seed: int = 0, shuffle: bool = True, mixture: dict[str, float] | None = None):
        if not sources:
            raise DataError("no data sources given")
        names = [s.name for s, _ in sources]
        if len(set(names)) != len(names):
            raise DataError(f"data source names must be unique, got {names}")
        self.sources = {s.name: s for s, _ in sources}
        self.cursors = {s.name: _Cursor(ds, source_seed(seed, i), shuffle, s.name) for i, (s, ds) in enumerate(sources)}
        self.offsets = {s.name: 0 for s, _ in sources}  # tokens of the current document already used
        self.tokenizer = tokenizer
        self.eos = eos_id(tokenizer)
        self.batch_size, self.seed = batch_size, seed
        self.rows = 0
        self._tok_cache: tuple[str, int, int, list[int]] | None = None
        self.set_phase(mixture, seq_len)

    def set_phase(self, mixture: dict[str, float] | None, seq_len: int) -> None:
        """Switch the mixture weights (name -> weight; missing names get 0) and the row length."""
        if mixture:
            unknown = [k for k in mixture if k not in self.sources]
            if unknown:
                raise DataError(f"mixture names unknown source {unknown[0]!r} (sources: {sorted(self.sources)})")
            w = {n: float(mixture.get(n, 0.0)) for n in self.sources}
        else:
            w = {n: s.weight for n, s in self.sources.items()}
        if sum(w.values()) <= 0:
            raise DataError(f"mixture weights sum to zero: {w}")
        self.names = list(self.sources)
        self.weights = torch.tensor([w[n] for n in self.names], dtype=torch.float64)
        self.seq_len = int(seq_len)

    def _doc_tokens(self, name: str) -> list[int]:
        cur = self.cursors[name]
        key = (name, cur.epoch, cur.index)
        if self._tok_cache is not None and self._tok_cache[:3] == key:
            return self._tok_cache[3]
        rec = cur.peek()
        field_ = self.sources[name].text_field
        if field_ not in rec:
            raise DataError(f"data source {name}: record {cur.index} has no field {field_!r} (fields: {sorted(rec)})")
        ids = encode_text(self.tokenizer, str(rec[field_])) + ([self.eos] if self.eos is not None else [])
        self._tok_cache = (*key, ids)
        return ids

    def _row(self) -> tuple[Tensor, Tensor, Tensor]:
        if len(self.names) == 1:
            name = self.names[0]
        else:
            g = torch.Generator().manual_seed(index_seed(self.seed, self.rows))
            name = self.names[int(torch.multinomial(self.weights, 1, generator=g))]
        self.rows += 1
        need = self.seq_len + 1
        toks: list[int] = []
        docs: list[int] = []
        d = 0
        while len(toks) < need:
            ids = self._doc_tokens(name)
            off = self.offsets[name]
            take = ids[off:off + need - len(toks)]
            toks += take
            docs += [d] * len(take)
            d += 1
            if off + len(take) >= len(ids):
                self.cursors[name].advance()
                self.offsets[name] = 0
            else:
                self.offsets[name] = off + len(take)
        return _make_row(toks, docs)

    def next_batch(self) -> PackedBatch:
        rows = [self._row() for _ in range(self.batch_size)]
        return PackedBatch(*(torch.stack(x) for x in zip(*rows)))

    def __iter__(self) -> Iterator[PackedBatch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"rows": self.rows, "seq_len": self.seq_len,
                "sources": {n: {**c.state_dict(), "offset": self.offsets[n]} for n, c in self.cursors.items()}}

    def load_state_dict(self, s: dict) -> None:
        self.rows = int(s["rows"])
        for n, cs in s["sources"].items():
            if n not in self.cursors:
                raise DataError(f"resume: data source {n!r} of the checkpoint is not configured")
            self.cursors[n].load_state_dict(cs)
            self.offsets[n] = int(cs["offset"])
        self._tok_cache = None


# ----------------------------------------------------------------------------- SFT


@dataclass
class SFTBatch:
    input_ids: Tensor   # [B, T] int64, right-padded with pad_id
    labels: Tensor      # [B, T] int64, -100 on padding and non-assistant tokens
    lengths: Tensor     # [B] int64, real tokens per row

    @property
    def n_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device) -> SFTBatch:
        return SFTBatch(self.input_ids.to(device), self.labels.to(device), self.lengths.to(device))


def collate_sft(examples: Sequence[tuple[list[int], list[bool] | list[int]]], pad: int,
                max_len: int | None = None) -> SFTBatch:
    """(ids, assistant_mask) pairs -> a batch padded to the longest sequence (after truncation).

    Position t predicts token t+1: labels[t] = ids[t+1] if token t+1 is an assistant token, else -100.
    """
    if not examples:
        raise DataError("collate_sft: empty batch")
    rows = []
    for ids, mask in examples:
        if len(ids) != len(mask):
            raise DataError(f"collate_sft: ids ({len(ids)}) and mask ({len(mask)}) differ in length")
        if max_len is not None:
            ids, mask = ids[:max_len + 1], mask[:max_len + 1]
        rows.append((ids, mask))
    T = max(len(ids) - 1 for ids, _ in rows)
    T = max(T, 1)
    B = len(rows)
    inp = torch.full((B, T), pad, dtype=torch.long)
    lab = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    lengths = torch.zeros(B, dtype=torch.long)
    for b, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        if n <= 0:
            continue
        t = torch.tensor(ids, dtype=torch.long)
        m = torch.tensor([bool(x) for x in mask])
        inp[b, :n] = t[:-1]
        lab[b, :n] = torch.where(m[1:], t[1:], torch.full_like(t[1:], IGNORE_INDEX))
        lengths[b] = n
    return SFTBatch(inp, lab, lengths)


class SFTLoader:
    """Batches of chat conversations (`messages` records), shuffled per epoch, exactly resumable.

    reasoning_off_share: fraction of samples rendered with reasoning switched off (chosen by a
    generator seeded from (seed, epoch, index), so the choice replays on resume).
    """

    def __init__(self, ds, tokenizer: Any, batch_size: int, max_len: int, seed: int = 0, shuffle: bool = True,
                 reasoning_off_share: float = 0.0, name: str = "sft", messages_field: str = "messages"):
        self.cursor = _Cursor(ds, seed, shuffle, name)
        self.tokenizer, self.batch_size, self.max_len = tokenizer, batch_size, max_len
        self.seed, self.reasoning_off_share, self.messages_field, self.name = seed, reasoning_off_share, messages_field, name

    def _encode(self, rec: dict):
        if self.messages_field not in rec:
            raise DataError(f"{self.name}: record {self.cursor.index} has no {self.messages_field!r} field "
                            f"(fields: {sorted(rec)})")
        g = torch.Generator().manual_seed(record_seed(self.seed, self.cursor.epoch, self.cursor.index))
        reasoning = bool(torch.rand((), generator=g) >= self.reasoning_off_share)
        try:
            enc = encode_chat(rec[self.messages_field], self.tokenizer, reasoning=reasoning)
        except DataError as e:
            raise DataError(f"{self.name}: record {self.cursor.index}: {e}") from None
        return enc.input_ids, enc.assistant_mask

    def next_batch(self) -> SFTBatch:
        ex = []
        while len(ex) < self.batch_size:
            ex.append(self._encode(self.cursor.peek()))
            self.cursor.advance()
        return collate_sft(ex, pad_id(self.tokenizer), self.max_len)

    @property
    def epoch(self) -> int:
        return self.cursor.epoch

    def __iter__(self) -> Iterator[SFTBatch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return self.cursor.state_dict()

    def load_state_dict(self, s: dict) -> None:
        self.cursor.load_state_dict(s)
