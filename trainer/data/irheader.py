"""The face payload inside a RecordIO record: MXNet's IRHeader, its labels, the image.

Byte format (docs/design.md §3, MXNet ``recordio.py``)::

    payload = IRHeader "<IfQQ" (uint32 flag, float32 label, uint64 id, uint64 id2)
              [flag > 0: header label is 0, then flag float32 labels]
              encoded image bytes

The record framing around it (magic, length, split parts, ``.idx``) is
:mod:`trainer.data.recordio`. Labels are float32, which holds every integer exactly only
below :math:`2^{24}`: :func:`class_id` refuses larger ids rather than merge classes.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np

from trainer.data.recordio import RecordIOError

IR_FORMAT = "<IfQQ"
_IR = struct.Struct(IR_FORMAT)
IR_SIZE = _IR.size  # 24
#: float32 represents every integer exactly only below 2**24 (docs/design.md §3).
MAX_EXACT_LABEL = 1 << 24


@dataclass
class IRHeader:
    """MXNet's image record header. ``label`` is a float or a float32 array (flag > 0)."""

    flag: int
    label: Union[float, np.ndarray]
    id: int = 0
    id2: int = 0

    @property
    def labels(self) -> np.ndarray:
        """All labels as a float32 array (length 1 for a scalar label)."""
        if self.flag > 0:
            return np.asarray(self.label, dtype=np.float32)
        return np.asarray([self.label], dtype=np.float32)


def pack(header: IRHeader, data: bytes = b"") -> bytes:
    """``mx.recordio.pack``: scalar label -> flag 0; array label -> flag = len, labels prepended."""
    label = header.label
    if isinstance(label, (int, float, np.integer, np.floating)):
        head = _IR.pack(0, float(label), header.id, header.id2)
        return head + bytes(data)
    arr = np.asarray(label, dtype=np.float32).reshape(-1)
    head = _IR.pack(arr.size, 0.0, header.id, header.id2)
    return head + arr.astype("<f4").tobytes() + bytes(data)


def unpack(payload: bytes, where: str = "record") -> Tuple[IRHeader, bytes]:
    """``mx.recordio.unpack``: returns (header, remaining bytes = encoded image)."""
    if len(payload) < IR_SIZE:
        raise RecordIOError(f"{where}: payload of {len(payload)} bytes is shorter than the {IR_SIZE}-byte IRHeader")
    flag, label, id_, id2 = _IR.unpack_from(payload, 0)
    rest = payload[IR_SIZE:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise RecordIOError(f"{where}: IRHeader flag {flag} needs {4 * flag} label bytes, payload has {len(rest)}")
        arr = np.frombuffer(rest, dtype="<f4", count=flag).astype(np.float32)
        return IRHeader(flag, arr, id_, id2), rest[4 * flag:]
    return IRHeader(0, float(label), id_, id2), rest


def class_id(header: IRHeader, where: str = "record", num_classes: Optional[int] = None) -> int:
    """The class id of an image record (first label), checked exact and in range.

    Refuses ids that float32 cannot hold exactly (>= 2**24): two classes could
    have been merged by the rounding (docs/design.md §3).
    """
    value = float(header.labels[0]) if header.flag > 0 else float(header.label)
    if not np.isfinite(value) or value != int(value):
        raise RecordIOError(f"{where}: label {value!r} is not an integer class id")
    cid = int(value)
    if cid < 0:
        raise RecordIOError(f"{where}: negative label {cid}")
    if cid >= MAX_EXACT_LABEL:
        raise RecordIOError(
            f"{where}: label {cid} >= 2^24 cannot be stored exactly in the float32 RecordIO "
            "label (neighbouring class ids collapse); refusing rather than merging classes"
        )
    if num_classes is not None and cid >= num_classes:
        raise RecordIOError(f"{where}: label {cid} out of range [0, {num_classes})")
    return cid


def check_label_exact(label: int) -> None:
    """Writer-side guard: refuse ids float32 cannot hold exactly."""
    if not 0 <= int(label) < MAX_EXACT_LABEL:
        raise ValueError(
            f"label {label} outside [0, 2^24): float32 RecordIO labels cannot hold it exactly"
        )
