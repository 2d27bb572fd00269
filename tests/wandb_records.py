"""Read the records of an offline W&B run (`run-<id>.wandb`) so tests can check what a run wrote.

The file is a 7-byte header (":W&B", magic, version) followed by a LevelDB-style log: 32 KiB blocks of
records, each with a 7-byte header (crc32, little-endian length, type FULL/FIRST/MIDDLE/LAST) and a
protobuf `Record` payload, split across blocks when long.
"""
import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK, HEADER, FILE_HEADER = 32768, 7, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = FILE_HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def summary(run_dir: Path) -> dict:
    """The run's summary as the explicit summary updates left it (later updates win)."""
    out = {}
    for record in records(next(Path(run_dir).glob("run-*.wandb"))):
        if record.HasField("summary"):
            for item in record.summary.update:
                key = item.key or "/".join(item.nested_key)
                out[key] = json.loads(item.value_json)
    return out
