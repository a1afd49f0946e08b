"""Reads what W&B wrote for an offline run (RUN/wandb/offline-run-*/run-ID.wandb), so that tests check
what reached W&B, not what was handed to it. The file is W&B's transaction log: a 7-byte header,
then LevelDB-log records (32 KiB blocks; each chunk has a 7-byte header: CRC, length, type) holding
wandb_internal_pb2.Record messages."""

import json
import struct
from pathlib import Path

import wandb
from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    position, pending = 7, b""  # ":W&B", a 2-byte magic and a version byte
    while position + 7 <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < 7:  # the block's tail is padding
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
        else:  # zeros past the end of what was written
            return


def _items(items) -> dict:
    """{key: value}; a logged object (a table, an image) comes as one item per field: nested back."""
    found: dict = {}
    for item in items:
        *parents, leaf = [item.key] if item.key else list(item.nested_key)
        node = found
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = json.loads(item.value_json)
    return found


def offline_runs(run_dir: Path) -> list[Path]:
    """The run's offline W&B runs, oldest first (a resumed run adds one, with the same id).

    W&B's service closes a run's log after `finish` has returned (`inform_finish` is not waited
    for); under load a log read at once missed its buffered records. Its teardown waits for that."""
    wandb.teardown()
    return sorted((Path(run_dir) / "wandb").glob("offline-run-*/run-*.wandb"))


def read_run(path: Path) -> dict:
    """{'id', 'name', 'group', 'project', 'config', 'history': {step: {key: value}}, 'summary', 'exit_code'}"""
    found = {"history": {}, "summary": {}, "config": {}, "exit_code": None}
    for payload in _payloads(Path(path).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            found |= {"id": record.run.run_id, "name": record.run.display_name, "group": record.run.run_group,
                      "project": record.run.project}
            found["config"] |= {item.key: json.loads(item.value_json) for item in record.run.config.update}
        elif kind == "config":
            found["config"] |= {item.key: json.loads(item.value_json) for item in record.config.update}
        elif kind == "history":
            items = _items(record.history.item)
            step = items.pop("_step", record.history.step.num)
            found["history"][step] = {k: v for k, v in items.items() if not k.startswith("_")}
        elif kind == "summary":
            found["summary"] |= _items(record.summary.update)
        elif kind == "exit":
            found["exit_code"] = record.exit.exit_code
    return found
