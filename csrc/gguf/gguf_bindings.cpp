// Python bindings of the GGUF engine: read a header, encode kv records, render a header. The bytes move through the
// shared file I/O bindings (write_file, overwrite_prefix, remove_ranges). Python (shortgpt_fast/surgery/gguf_cut.py)
// plans what to write; nothing here imports torch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "gguf/gguf_format.h"

namespace py = pybind11;

namespace sgf {
namespace gguf {
namespace {

py::object scalar_to_python(const Scalar& v) {
    switch (v.type) {
        case kU8: case kU16: case kU32: case kU64: return py::int_(v.u);
        case kI8: case kI16: case kI32: case kI64: return py::int_(v.i);
        case kF32: case kF64: return py::float_(v.f);
        case kBool: return py::bool_(v.u != 0);
        case kString: {
            PyObject* s = PyUnicode_DecodeUTF8(v.s.data(), static_cast<Py_ssize_t>(v.s.size()), "strict");
            if (s) return py::reinterpret_steal<py::object>(s);
            PyErr_Clear();
            return py::bytes(v.s);  // not UTF-8: handed over as bytes, carried verbatim anyway
        }
        default: return py::none();
    }
}

Scalar scalar_from_python(uint32_t type, const py::handle& value) {
    Scalar v;
    v.type = type;
    switch (type) {
        case kU8: case kU16: case kU32: case kU64: case kBool: v.u = value.cast<uint64_t>(); break;
        case kI8: case kI16: case kI32: case kI64: v.i = value.cast<int64_t>(); break;
        case kF32: case kF64: v.f = value.cast<double>(); break;
        case kString: v.s = value.cast<std::string>(); break;
        default: throw std::invalid_argument("cannot encode GGUF value type " + std::to_string(type));
    }
    return v;
}

py::dict file_to_python(const GgufFile& g) {
    py::dict d;
    d["version"] = g.version;
    d["alignment"] = g.alignment;
    d["file_size"] = g.file_size;
    d["header_end"] = g.header_end;
    d["data_start"] = g.data_start;
    d["data_size"] = g.data_size;
    py::list kvs;
    for (auto& kv : g.kvs) {
        py::object value = py::none();
        if (kv.decoded) {
            if (kv.type == kArray) {
                py::list items;
                for (auto& s : kv.values) items.append(scalar_to_python(s));
                value = items;
            } else {
                value = scalar_to_python(kv.values[0]);
            }
        }
        kvs.append(py::make_tuple(kv.key, kv.type, kv.elem_type, kv.count, value, kv.record_begin, kv.record_end));
    }
    d["kvs"] = kvs;
    py::list tensors;
    for (auto& t : g.tensors) tensors.append(py::make_tuple(t.name, t.dims, t.type, t.offset, t.nbytes));
    d["tensors"] = tensors;
    return d;
}

}  // namespace
}  // namespace gguf
}  // namespace sgf

void register_gguf(py::module_& m) {
    using namespace sgf;
    using namespace sgf::gguf;
    py::register_exception<GgufFormatError>(m, "GgufFormatError", m.attr("FileFormatError"));

    m.def(
        "gguf_read",
        [](const std::string& path) {
            GgufFile g;
            {
                py::gil_scoped_release release;
                g = parse_file(path);
            }
            return file_to_python(g);
        },
        py::arg("path"),
        "Parse and validate a GGUF v2/v3 file's header. Returns {version, alignment, file_size, header_end, "
        "data_start, data_size, kvs: [(key, type, elem_type, count, value, record_begin, record_end)], tensors: "
        "[(name, dims, ggml_type, offset, nbytes)]}; value is None for arrays too long to decode and for string "
        "arrays. Raises GgufFormatError (a ValueError) naming the file and what is wrong.");

    m.def(
        "gguf_encode_record",
        [](const std::string& key, uint32_t type, uint32_t elem_type, const py::object& value) {
            std::vector<Scalar> values;
            if (type == kArray) {
                for (auto item : value) values.push_back(scalar_from_python(elem_type, item));
            } else {
                values.push_back(scalar_from_python(type, value));
            }
            return py::bytes(encode_record(key, type, elem_type, values));
        },
        py::arg("key"), py::arg("type"), py::arg("elem_type"), py::arg("value"),
        "One GGUF kv record (key, type, value) as bytes; arrays take `elem_type` and a sequence.");

    m.def(
        "gguf_render_header",
        [](uint32_t version, const std::vector<py::bytes>& records,
           const std::vector<std::tuple<std::string, std::vector<uint64_t>, uint32_t, uint64_t>>& tensors,
           uint64_t alignment) {
            std::vector<std::string> recs;
            for (auto& r : records) recs.push_back(r);
            std::vector<TensorInfo> infos;
            for (auto& [name, dims, type, offset] : tensors) {
                TensorInfo t;
                t.name = name;
                t.dims = dims;
                t.type = type;
                t.offset = offset;
                auto [block, bytes] = tensor_type_size(type);
                if (block == 0 || dims.empty()) throw std::invalid_argument("tensor '" + name + "': bad type or shape");
                uint64_t elements = 1;
                for (uint64_t d : dims) elements *= d;
                t.nbytes = elements / block * bytes;
                infos.push_back(std::move(t));
            }
            return py::bytes(render_header(version, recs, infos, alignment));
        },
        py::arg("version"), py::arg("records"), py::arg("tensors"), py::arg("alignment"),
        "Header bytes (magic to the zero padding before the data) for `records` (encoded kv records, verbatim) and "
        "`tensors` [(name, dims, ggml_type, offset)], offsets following each other with alignment padding.");
}
