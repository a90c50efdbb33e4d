"""The one safetensors reader (shortgpt_fast.io.safetensors): every dtype safetensors defines has its size, an unknown
dtype is refused in one line by every caller, a huge header is refused before it is read, and the C++ and Python
readers agree."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from test_cut_checkpoint import _checkpoint_dir, _entry, _layer_tensors, _raw_safetensors
from test_cut_real_model_and_fuzz import _mutated

from shortgpt_fast.io import safetensors as st
from shortgpt_fast.scoring import streamed
from shortgpt_fast.scoring.streamed import CheckpointShards, StreamingError
from shortgpt_fast.surgery.checkpoint import SurgeryError, cut_checkpoint

try:
    from shortgpt_fast import _C

    HAVE_NATIVE = hasattr(_C, "safetensors_read_header")
except ImportError:
    HAVE_NATIVE = False

ENGINES = ["python"] + (["native"] if HAVE_NATIVE else [])
needs_native = pytest.mark.skipif(not HAVE_NATIVE, reason="shortgpt_fast._C with the surgery half is not built")

# Bytes per element as safetensors 0.8 defines them (the Rust `Dtype` enum; F4 and F6 are packed, 2 and 4/3 per
# byte). Written out by hand, not derived from the table under test.
SAFETENSORS_0_8_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}


def _file(path: Path, header: dict, data: bytes, length: int | None = None) -> Path:
    _raw_safetensors(path, json.dumps(header).encode(), data, length)
    return path


def _one_tensor(path: Path, dtype: str, shape: tuple, name: str = "model.layers.0.w") -> Path:
    nbytes = st.DTYPE_BITS[dtype] * _count(shape) // 8
    return _file(path, {name: _entry(dtype=dtype, shape=shape, offsets=(0, nbytes))}, b"\x01" * nbytes)


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_table_is_exactly_what_safetensors_defines():
    assert st.DTYPE_BITS == SAFETENSORS_0_8_BITS
    import safetensors

    # The enum this table was written from; a newer safetensors may add dtypes, which must then be added here and in
    # csrc/safetensors_surgery.cpp `dtype_bits`.
    assert safetensors.__version__.startswith("0.8"), safetensors.__version__


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", sorted(SAFETENSORS_0_8_BITS))
def test_every_dtype_reads_with_its_byte_size(tmp_path, dtype, engine):
    bits = SAFETENSORS_0_8_BITS[dtype]
    shape = (3, 8)  # 24 elements: whole bytes for every dtype, 4- and 6-bit ones included
    path = _one_tensor(tmp_path / "m.safetensors", dtype, shape)
    header = st.read_header(path, engine=engine)
    assert header["tensors"] == [("model.layers.0.w", dtype, shape, 0, 24 * bits // 8)]
    assert st.dtype_bits(dtype) == bits
    assert st.tensor_nbytes(dtype, shape) == 24 * bits // 8


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype,elements", [("F4", 3), ("F6_E2M3", 5), ("F6_E3M2", 1)])
def test_packed_dtypes_must_fill_whole_bytes(tmp_path, dtype, elements, engine):
    path = _file(tmp_path / "m.safetensors", {"w": _entry(dtype=dtype, shape=(elements,), offsets=(0, 1))}, b"\x01")
    with pytest.raises(st.SafetensorsError, match="whole bytes"):
        st.read_header(path, engine=engine)
    with pytest.raises(st.SafetensorsError, match="whole bytes"):
        st.tensor_nbytes(dtype, (elements,))


@pytest.mark.parametrize("engine", ENGINES)
def test_unknown_dtype_is_refused_naming_file_tensor_and_dtype(tmp_path, engine):
    path = _file(tmp_path / "m.safetensors", {"model.layers.0.w": _entry(dtype="F3_E1M1", shape=(2,), offsets=(0, 8))},
                 b"\x01" * 8)
    with pytest.raises(st.SafetensorsError) as err:
        st.read_header(path, engine=engine)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message and "'model.layers.0.w'" in message and "unknown dtype 'F3_E1M1'" in message
    with pytest.raises(st.SafetensorsError, match="unknown dtype 'F3_E1M1'"):
        st.dtype_bits("F3_E1M1")


def _folder_with_unknown_dtype(tmp_path: Path) -> Path:
    src = _checkpoint_dir(tmp_path)
    header, data = _layer_tensors()
    header["model.layers.1.mlp.weight"]["dtype"] = "Q7"
    _file(src / "model.safetensors", header, data)
    return src


def test_streamed_scoring_refuses_an_unknown_dtype(tmp_path):
    src = _folder_with_unknown_dtype(tmp_path)
    for attempt in (lambda: CheckpointShards(str(src)).total_bytes(),
                    lambda: streamed.streaming_decision(str(src), "float32", "cpu")):
        with pytest.raises(StreamingError) as err:
            attempt()
        message = str(err.value)
        assert "\n" not in message
        assert "model.safetensors" in message and "'model.layers.1.mlp.weight'" in message and "'Q7'" in message


@needs_native
def test_cut_refuses_an_unknown_dtype(tmp_path):
    src = _folder_with_unknown_dtype(tmp_path)
    with pytest.raises(SurgeryError) as err:
        cut_checkpoint(src, [1], out=tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message
    assert "model.safetensors" in message and "'model.layers.1.mlp.weight'" in message and "'Q7'" in message
    assert not (tmp_path / "out").exists()


@needs_native
def test_cut_accepts_the_dtypes_the_cpp_reader_used_to_refuse(tmp_path):
    src = _checkpoint_dir(tmp_path)
    header, data = _layer_tensors()
    for name in header:  # 2 x F32 = 8 bytes = 8 elements of an 8-bit dtype
        header[name] = {**header[name], "dtype": "F8_E4M3FNUZ", "shape": [8]}
    _file(src / "model.safetensors", header, data)
    cut_checkpoint(src, [1], out=tmp_path / "out", verify=False)
    kept = st.read_header(tmp_path / "out" / "model.safetensors")["tensors"]
    assert [t[0] for t in kept] == ["model.embed_tokens.weight", "model.layers.0.mlp.weight"]


@pytest.mark.parametrize("engine", ENGINES)
def test_header_over_the_limit_is_refused_without_reading_it(tmp_path, engine):
    path = tmp_path / "huge.safetensors"
    declared = st.MAX_HEADER_BYTES + 1
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", declared))
        fh.truncate(8 + declared + 8)  # sparse: the file really is that long, so only the limit can refuse it
    tracemalloc.start()
    try:
        with pytest.raises(st.SafetensorsError, match="exceeds the 100 MB safetensors limit") as err:
            st.read_header(path, engine=engine)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert peak < 1_000_000, peak  # nothing near the 100 MB it declares was read


def test_python_reader_reads_only_the_length_when_it_is_over_the_limit(tmp_path, monkeypatch):
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", 2**40))
        fh.write(b"{" * 64)
    reads = []
    real = st._read_exactly
    monkeypatch.setattr(st, "_read_exactly", lambda fh, n, p: reads.append(n) or real(fh, n, p))
    with pytest.raises(st.SafetensorsError, match="100 MB"):
        st.read_header(path, engine="python")
    assert reads == [8]


@pytest.mark.parametrize("engine", ENGINES)
def test_index_and_single_file_weight_maps(tmp_path, engine):
    header, data = _layer_tensors()
    _file(tmp_path / "model.safetensors", header, data)
    assert st.read_weight_map(tmp_path, engine=engine) == {n: "model.safetensors" for n in header}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors"}}))
    assert st.read_weight_map(tmp_path, engine=engine) == {"a": "s1.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": []}')
    with pytest.raises(st.SafetensorsError, match="weight_map"):
        st.read_weight_map(tmp_path, engine=engine)
    assert st.read_weight_map(tmp_path / "nothing-here") is None


@pytest.mark.parametrize("engine", ENGINES)
def test_truncation_names_the_tensor_it_cuts(tmp_path, engine):
    # JSON order differs from data order: the message names the tensor the truncation falls in, not the first listed.
    header = {"z.first": _entry(offsets=(0, 8)), "a.second": _entry(offsets=(8, 16)), "b.third": _entry(offsets=(16, 24))}
    path = _file(tmp_path / "m.safetensors", header, b"\x01" * 12)
    with pytest.raises(st.SafetensorsError, match="tensor 'a.second': data_offsets end at 16"):
        st.read_header(path, engine=engine)


@needs_native
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=_mutated())
def test_python_and_cpp_readers_agree(tmp_path, blob):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(blob)
    results = []
    for engine in ("native", "python"):
        try:
            results.append(st.read_header(path, engine=engine))
        except st.SafetensorsError as err:
            assert str(err) and "\n" not in str(err)
            results.append("refused")
    assert results[0] == results[1], results


def test_the_reader_does_not_import_torch():
    code = ("import sys; from shortgpt_fast.io import safetensors; safetensors.DTYPE_BITS; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
