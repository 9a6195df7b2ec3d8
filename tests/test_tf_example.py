"""The in-place tf.train.Example reader against protobuf's own parser (TFDS's copy of the schema)."""

import struct

import numpy as np
import pytest
from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2

from crrf_jax.data.tf_example import ExampleError, parse_example

# --------------------------------------------------------------------------- a wire-format writer for tests
# protobuf writes one canonical form (packed numbers, one entry a key, no unknown fields); parsers must also
# read the others, which only a hand-written encoder produces.


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _tag(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _len_field(number: int, payload: bytes) -> bytes:
    return _tag(number, 2) + _varint(len(payload)) + payload


def _unknown(rng: np.random.Generator) -> bytes:
    """A field no message of the schema has (numbers 5-9), of a random wire type."""
    number = int(rng.integers(5, 10))
    wire = int(rng.choice([0, 1, 2, 5]))
    if wire == 0:
        return _tag(number, 0) + _varint(int(rng.integers(0, 2**63)))
    if wire == 1:
        return _tag(number, 1) + rng.bytes(8)
    if wire == 5:
        return _tag(number, 5) + rng.bytes(4)
    return _len_field(number, rng.bytes(int(rng.integers(0, 6))))


def _list_message(kind: str, values: list, packed: bool, rng: np.random.Generator) -> bytes:
    if kind == "bytes_list":
        body = b"".join(_len_field(1, v) for v in values)
    elif kind == "int64_list":
        if packed:
            body = _len_field(1, b"".join(_varint(v) for v in values)) if values else b""
        else:
            body = b"".join(_tag(1, 0) + _varint(v) for v in values)
    else:
        if packed:
            body = _len_field(1, struct.pack(f"<{len(values)}f", *values)) if values else b""
        else:
            body = b"".join(_tag(1, 5) + struct.pack("<f", v) for v in values)
    if rng.random() < 0.3:
        body += _unknown(rng)
    return body


_KIND_NUMBER = {"bytes_list": 1, "float_list": 2, "int64_list": 3}


def _random_values(kind: str, rng: np.random.Generator) -> list:
    n = int(rng.integers(0, 5))
    if kind == "bytes_list":
        return [rng.bytes(int(rng.integers(0, 40))) for _ in range(n)]
    if kind == "int64_list":
        return [int(v) for v in rng.integers(-(2**63), 2**63, size=n, dtype=np.int64)]
    specials = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45]
    return [float(rng.choice(specials)) if rng.random() < 0.3 else float(np.float32(rng.normal() * 1e3))
            for _ in range(n)]


def _random_feature(rng: np.random.Generator) -> bytes:
    """A Feature message: one or more kind fields (a later kind replaces an earlier one), maybe unknowns."""
    parts = []
    for _ in range(int(rng.integers(0, 3))):
        kind = str(rng.choice(list(_KIND_NUMBER)))
        payload = _list_message(kind, _random_values(kind, rng), bool(rng.random() < 0.5), rng)
        parts.append(_len_field(_KIND_NUMBER[kind], payload))
        if rng.random() < 0.2:
            parts.append(_unknown(rng))
    return b"".join(parts)


def _random_example(rng: np.random.Generator) -> bytes:
    """A serialized Example using every latitude of the wire format: repeated keys and Features fields,
    a value split over several fields of its map entry, packed and unpacked lists, unknown fields."""
    keys = [f"k{i}" for i in range(4)] + ["s2/value", "émoji✓"]
    features = []
    for _ in range(int(rng.integers(1, 3))):
        entries = []
        for _ in range(int(rng.integers(0, 6))):
            entry = []
            if rng.random() < 0.9:
                entry.append(_len_field(1, str(rng.choice(keys)).encode()))
            for _ in range(int(rng.integers(0, 3))):
                entry.append(_len_field(2, _random_feature(rng)))
            if rng.random() < 0.2:
                entry.append(_unknown(rng))
            rng.shuffle(entry)  # a map entry's key may come after its value
            entries.append(_len_field(1, b"".join(entry)))
            if rng.random() < 0.1:
                entries.append(_unknown(rng))
        features.append(_len_field(1, b"".join(entries)))
        if rng.random() < 0.2:
            features.append(_unknown(rng))
    return b"".join(features)


# --------------------------------------------------------------------------------------------- comparison


def _reference(record: bytes) -> dict:
    example = tf_example_pb2.Example.FromString(record)
    out = {}
    for key, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        values = list(getattr(feature, kind).value) if kind else []
        out[key] = (kind, values)
    return out


def _ours(record: bytes) -> dict:
    out = {}
    for key, feature in parse_example(record).items():
        if feature.kind == "bytes_list":
            values = [bytes(v) for v in feature.values]
        elif feature.kind == "float_list":
            values = [float(v) for v in feature.floats()]
        else:
            values = list(feature.values)
        out[key] = (feature.kind, values)
    return out


def _assert_same(ours: dict, reference: dict, record: bytes) -> None:
    assert ours.keys() == reference.keys(), record.hex()
    for key, (kind, values) in reference.items():
        assert ours[key][0] == kind, (key, record.hex())
        if kind == "float_list":  # bit for bit, NaN and -0.0 included
            np.testing.assert_array_equal(np.array(ours[key][1], np.float32).view(np.uint32),
                                          np.array(values, np.float32).view(np.uint32), err_msg=key)
        else:
            assert ours[key][1] == values, (key, record.hex())


def test_reads_what_protobuf_writes():
    rng = np.random.default_rng(0)
    example = tf_example_pb2.Example()
    feature = example.features.feature
    feature["s2/value"].bytes_list.value.append(rng.bytes(13 * 8 * 8 * 2))
    feature["s2/shape"].int64_list.value.extend([8, 8, 13])
    feature["id"].bytes_list.value.append("ROIs1158_spring_1_p30".encode())
    feature["floats"].float_list.value.extend([0.5, -2.0, np.nan])
    feature["negative"].int64_list.value.extend([-1, -(2**63), 2**63 - 1, 0])
    feature["empty_bytes"].bytes_list.SetInParent()
    feature["unset"].CopyFrom(tf_feature_pb2.Feature())
    record = example.SerializeToString()
    parsed = parse_example(record)
    _assert_same(_ours(record), _reference(record), record)
    assert parsed["unset"].kind is None and parsed["empty_bytes"].kind == "bytes_list"
    assert parsed["floats"].floats().dtype == np.float32


def test_reads_every_wire_form_as_protobuf_does():
    rng = np.random.default_rng(0)
    for _ in range(300):
        record = _random_example(rng)
        _assert_same(_ours(record), _reference(record), record)


def test_concatenated_records_merge_as_protobuf_merges():
    rng = np.random.default_rng(1)
    for _ in range(50):
        record = _random_example(rng) + _random_example(rng)
        _assert_same(_ours(record), _reference(record), record)


def test_values_are_views_of_the_record():
    example = tf_example_pb2.Example()
    payload = np.arange(4096, dtype=np.uint16)
    example.features.feature["a"].bytes_list.value.append(payload.tobytes())
    example.features.feature["f"].float_list.value.extend([1.0, 2.0, 3.0])
    record = example.SerializeToString()
    parsed = parse_example(record)
    array = np.frombuffer(parsed["a"].values[0], np.uint16)
    np.testing.assert_array_equal(array, payload)
    whole = np.frombuffer(record, np.uint8)
    assert np.shares_memory(array, whole) and np.shares_memory(parsed["f"].values[0], whole)


def test_every_cut_of_a_record_fails_or_reads_as_protobuf_does():
    rng = np.random.default_rng(2)
    for _ in range(4):
        record = _random_example(rng)
        for cut in range(len(record)):
            prefix = record[:cut]
            try:
                reference = _reference(prefix)
            except Exception:  # protobuf's DecodeError
                with pytest.raises(ExampleError):
                    parse_example(prefix)
                continue
            _assert_same(_ours(prefix), reference, prefix)


@pytest.mark.parametrize(
    "record, match",
    [
        (_tag(1, 2) + _varint(10) + b"abc", "truncated"),
        (b"\x0a\x80", "truncated"),  # a length varint cut short
        (_tag(1, 3), "wire type 3"),
        (_tag(1, 7) + b"x", "wire type 7"),
        (b"\x00\x01", "field number 0"),
        (_tag(9, 0) + b"\xff" * 11, "longer than 10 bytes"),
        (_len_field(1, _len_field(1, _len_field(1, b"\xff\xfe") + _len_field(2, b""))), "not UTF-8"),
        (_len_field(1, _len_field(1, _len_field(1, b"x") + _len_field(2, _len_field(2, _len_field(1, b"abcde"))))),
         "whole number of floats"),
    ],
)
def test_malformed_records_are_refused(record, match):
    with pytest.raises(Exception):  # protobuf refuses them too
        tf_example_pb2.Example.FromString(record)
    with pytest.raises(ExampleError, match=match):
        parse_example(record)


def test_a_feature_of_another_kind_is_refused():
    example = tf_example_pb2.Example()
    example.features.feature["shape"].float_list.value.extend([8.0, 8.0])
    feature = parse_example(example.SerializeToString())["shape"]
    assert feature.of("float_list") == feature.values
    with pytest.raises(ExampleError, match="a feature of kind float_list where int64_list was expected"):
        feature.of("int64_list")
    with pytest.raises(ExampleError, match="of kind None where bytes_list"):
        parse_example(b"\x0a\x05\x0a\x03\x0a\x01k")["k"].of("bytes_list")
