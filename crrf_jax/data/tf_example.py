"""Serialized `tf.train.Example` records read in place: each feature's values as views of the record's bytes.

protobuf's parser copies every bytes value into the message it builds, and reading `bytes_list.value[0]`
copies it once more into a Python bytes: about 0.6 ms for a 4 MB SEN12MS-CR record, a fifth of the time the
pipeline spends on a record (BENCHMARKS.md, "Data pipeline"). `parse_example` walks the wire format instead
(https://protobuf.dev/programming-guides/encoding/) and hands out memoryviews into the record, so
`np.frombuffer` of a value is the stored array with no copy.

It reads what protobuf's own parser reads, field for field (tests/test_tf_example.py checks it against
`tensorflow_datasets.proto.tf_example_pb2`): fields repeated at any level merge as protobuf merges them
(map entries: the last one for a key wins; a Feature met twice: values of one kind concatenate, a new kind
replaces the old), packed and unpacked numeric lists both, unknown fields and known field numbers with an
unexpected wire type skipped (a map entry holding one is skipped whole, as upb does). Groups (wire types 3
and 4), which nothing in Example's schema uses, are refused where protobuf would skip them. A record that is
not valid wire format raises `ExampleError`.

Example -> features (1) -> feature map (1: entries of key (1) and Feature (2)); Feature -> one of bytes_list
(1), float_list (2), int64_list (3), each a list of values (1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_KINDS = {1: "bytes_list", 2: "float_list", 3: "int64_list"}


class ExampleError(ValueError):
    """The bytes are not a serialized tf.train.Example (truncated, or not protobuf wire format)."""


@dataclasses.dataclass
class Feature:
    """One feature: its kind ("bytes_list", "float_list", "int64_list"; None when unset) and its values:
    memoryviews into the record for bytes_list, ints for int64_list, float32 arrays (views of the record
    where packed) concatenated for float_list."""

    kind: str | None = None
    values: list = dataclasses.field(default_factory=list)

    def of(self, kind: str) -> list:
        """The values, which must be of that kind (ExampleError otherwise)."""
        if self.kind != kind:
            raise ExampleError(f"a feature of kind {self.kind} where {kind} was expected")
        return self.values

    def floats(self) -> np.ndarray:
        return np.concatenate(self.values) if self.values else np.zeros(0, np.float32)


def parse_example(record: bytes | memoryview) -> dict[str, Feature]:
    """The features of a serialized tf.train.Example, by name. Raises ExampleError on malformed bytes."""
    view = memoryview(record).cast("B")
    features: dict[str, Feature] = {}
    for number, wire, start, end in _fields(view, 0, len(view)):
        if number == 1 and wire == _LEN:  # Example.features
            for number2, wire2, start2, end2 in _fields(view, start, end):
                if number2 == 1 and wire2 == _LEN:  # Features.feature: a map entry
                    entry = _map_entry(view, start2, end2)
                    if entry is not None:
                        features[entry[0]] = entry[1]
    return features


def _map_entry(view: memoryview, start: int, end: int) -> tuple[str, Feature] | None:
    """(key, Feature) of a map entry; None for an entry holding any other field, which protobuf (upb) keeps
    among the Example's unknown fields instead of the map."""
    key = b""
    spans = []
    for number, wire, vstart, vend in _fields(view, start, end):
        if wire != _LEN or number not in (1, 2):
            return None
        if number == 1:
            key = view[vstart:vend]
        elif number == 2:
            spans.append((vstart, vend))
    feature = Feature()
    for vstart, vend in spans:  # a value met several times merges, in order
        _merge_feature(view, vstart, vend, feature)
    try:
        return bytes(key).decode(), feature
    except UnicodeDecodeError as err:
        raise ExampleError(f"a feature name is not UTF-8 ({err})") from None


def _merge_feature(view: memoryview, start: int, end: int, feature: Feature) -> None:
    for number, wire, vstart, vend in _fields(view, start, end):
        kind = _KINDS.get(number)
        if kind is None or wire != _LEN:
            continue
        if feature.kind != kind:  # oneof: another kind replaces what was there
            feature.kind, feature.values = kind, []
        for inner, inner_wire, istart, iend in _fields(view, vstart, vend):
            if inner != 1:
                continue
            if kind == "bytes_list":
                if inner_wire == _LEN:
                    feature.values.append(view[istart:iend])
            elif kind == "int64_list":
                if inner_wire == _VARINT:  # _fields gives a varint's value in place of its start
                    feature.values.append(_signed(istart))
                elif inner_wire == _LEN:
                    pos = istart
                    while pos < iend:
                        value, pos = _varint(view, pos, iend)
                        feature.values.append(_signed(value))
            elif inner_wire == _I32:
                feature.values.append(np.frombuffer(view[istart:iend], "<f4").astype(np.float32))
            elif inner_wire == _LEN:
                if (iend - istart) % 4:
                    raise ExampleError("a packed float list is not a whole number of floats")
                feature.values.append(np.frombuffer(view[istart:iend], "<f4"))


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(view: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, start, end) of each field of the message in view[start:end]; for a varint
    field, start is its value and end its end."""
    pos = start
    while pos < end:
        tag, pos = _varint(view, pos, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise ExampleError(f"field number 0 at byte {pos}")
        if wire == _VARINT:
            value, pos = _varint(view, pos, end)
            yield number, wire, value, pos
            continue
        if wire == _LEN:
            size, pos = _varint(view, pos, end)
            field_end = pos + size
        elif wire == _I64:
            field_end = pos + 8
        elif wire == _I32:
            field_end = pos + 4
        else:  # 3 and 4 (groups) are not in Example's schema; 6 and 7 are no wire type
            raise ExampleError(f"wire type {wire} at byte {pos}")
        if field_end > end:
            raise ExampleError(f"field {number} runs {field_end - end} bytes past its message (truncated)")
        yield number, wire, pos, field_end
        pos = field_end


def _varint(view: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end:
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & ((1 << 64) - 1), pos
        shift += 7
        if shift >= 70:
            raise ExampleError(f"a varint longer than 10 bytes at byte {pos}")
    raise ExampleError("the record ends inside a varint (truncated)")
