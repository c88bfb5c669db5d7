"""Read an offline W&B run file (``run-<id>.wandb``) back; wandb 0.31 ships no reader.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1 as a little-endian
u16, version 0), then 32 KiB blocks of chunks ``[crc32 u32][length u16][type u8][payload]``, the
CRC covering the type byte and the payload. A record is one FULL chunk, or FIRST, MIDDLE..., LAST
chunks across blocks; a block tail too short for a chunk header is padding. The file header
counts toward the first block. Each record is a ``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024
CHUNK = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    if not data.startswith(HEADER):
        raise ValueError(f"{path}: not a W&B run file (starts with {data[:7]!r})")
    records, parts, offset = [], [], len(HEADER)
    while True:
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < CHUNK.size:
            offset += left_in_block
        if offset + CHUNK.size > len(data):
            break
        crc, length, kind = CHUNK.unpack_from(data, offset)
        payload = data[offset + CHUNK.size : offset + CHUNK.size + length]
        if len(payload) != length or zlib.crc32(bytes([kind]) + payload) != crc:
            raise ValueError(f"{path}: truncated or corrupt chunk at byte {offset}")
        offset += CHUNK.size + length
        if kind in (FULL, FIRST):
            parts = [payload]
        elif kind in (MIDDLE, LAST) and parts:
            parts.append(payload)
        else:
            raise ValueError(f"{path}: unexpected chunk type {kind} at byte {offset}")
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    if parts:
        raise ValueError(f"{path}: ends inside a record")
    return records


def _key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


def history(records: list[wandb_internal_pb2.Record]) -> list[dict[str, Any]]:
    """Every logged history row, in order, with its ``_step``."""
    return [
        {_key(item): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]


def config(records: list[wandb_internal_pb2.Record]) -> dict[str, Any]:
    """The run's config: the values given at init, then every update, in order."""
    values: dict[str, Any] = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        update = r.run.config if kind == "run" else r.config if kind == "config" else None
        if update is not None:
            values.update({_key(item): json.loads(item.value_json) for item in update.update})
    return values


def summary(records: list[wandb_internal_pb2.Record]) -> dict[str, Any]:
    """The summary as W&B keeps it: the last value written for each key."""
    values: dict[str, Any] = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            values.update({_key(item): json.loads(item.value_json) for item in r.summary.update})
    return values


def run_id(records: list[wandb_internal_pb2.Record]) -> str:
    return next(r.run.run_id for r in records if r.WhichOneof("record_type") == "run")
