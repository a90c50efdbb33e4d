// safetensors checkpoint surgery: validate shard headers, render rewritten headers, and move tensor bytes between
// files without ever holding more than a header plus a fixed buffer in memory.
//
// Python (shortgpt_fast/surgery/checkpoint.py) decides *what* to write; this file only checks inputs and does I/O.
// Every function releases the GIL while it touches the disk, and every failure is a one-line message that names the
// file (and the tensor, where there is one).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <fcntl.h>

#include <algorithm>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "surgery/file_io.h"
#include "surgery/safetensors_json.h"

namespace py = pybind11;

namespace sgf {
namespace {

// The safetensors reader refuses larger headers, so anything bigger is hostile or corrupt and must not be allocated.
constexpr uint64_t kMaxHeaderBytes = 100ull * 1000 * 1000;

[[noreturn]] void throw_format(const std::string& path, const std::string& why) {
    throw SafetensorsFormatError(printable(path + ": " + why));
}

// Bits per element: every dtype safetensors 0.8 defines (its Rust `Dtype` enum has these 22 variants). Sub-byte
// float formats exist in safetensors >= 0.6, so sizes are computed in bits. shortgpt_fast/io/safetensors.py holds the
// same table (DTYPE_BITS) for the pure-Python fallback, and a test checks the two agree.
int dtype_bits(const std::string& dtype) {
    static const std::map<std::string, int> table = {
        {"BOOL", 8}, {"U8", 8}, {"I8", 8}, {"F8_E5M2", 8}, {"F8_E4M3", 8}, {"F8_E8M0", 8},
        {"F8_E4M3FNUZ", 8}, {"F8_E5M2FNUZ", 8},
        {"I16", 16}, {"U16", 16}, {"F16", 16}, {"BF16", 16},
        {"I32", 32}, {"U32", 32}, {"F32", 32},
        {"I64", 64}, {"U64", 64}, {"F64", 64}, {"C64", 64},
        {"F4", 4}, {"F6_E2M3", 6}, {"F6_E3M2", 6},
    };
    auto it = table.find(dtype);
    return it == table.end() ? 0 : it->second;
}

struct TensorEntry {
    std::string name;
    std::string dtype;
    std::vector<uint64_t> shape;
    uint64_t begin = 0, end = 0;
};

struct ParsedHeader {
    uint64_t header_len = 0;
    uint64_t file_size = 0;
    bool has_metadata = false;
    std::vector<std::pair<std::string, std::string>> metadata;
    std::vector<TensorEntry> tensors;  // in data order
};

// No real tensor has more dimensions than numpy (64) or torch allow; the cap keeps a hostile `shape` of millions of
// zeros from turning a header into a vector of millions of dims per tensor.
constexpr size_t kMaxRank = 64;
// Real headers nest three levels (header > tensor > shape); anything much deeper is junk and is refused by name.
constexpr int kMaxDepth = 32;

uint64_t u64_field(JsonCursor& c, const std::string& path, const std::string& tensor, const char* field) {
    c.skip_ws();
    char p = c.peek();
    if (p != '-' && !(p >= '0' && p <= '9'))
        throw_format(path, "tensor '" + tensor + "': " + field + " must hold non-negative integers, got a non-number");
    JsonNumber v = c.parse_number();
    if (!v.is_u64)
        throw_format(path, "tensor '" + tensor + "': " + field + " must hold non-negative integers, got " + v.text);
    return v.u64;
}

void parse_metadata(JsonCursor& c, const std::string& path, ParsedHeader& out) {
    if (c.peek() != '{') throw_format(path, "__metadata__ must be an object of strings");
    c.expect('{');
    std::set<std::string> meta_seen;
    if (c.take('}')) return;
    do {
        std::string key = c.key();
        if (c.peek() != '"') throw_format(path, "__metadata__ value for '" + key + "' is not a string");
        std::string value = c.parse_string();
        if (!meta_seen.insert(key).second) throw_format(path, "duplicate key '" + key + "' in __metadata__");
        out.metadata.emplace_back(std::move(key), std::move(value));
    } while (c.next_or_close('}'));
}

TensorEntry parse_tensor(JsonCursor& c, const std::string& path, const std::string& name) {
    if (c.peek() != '{') throw_format(path, "tensor '" + name + "': entry is not an object");
    c.expect('{');
    TensorEntry t;
    t.name = name;
    bool has_dtype = false, has_shape = false, has_offsets = false;
    if (!c.take('}')) {
        do {
            std::string key = c.key();
            if (key == "dtype" && !has_dtype) {
                if (c.peek() != '"') throw_format(path, "tensor '" + name + "': dtype is not a string");
                t.dtype = c.parse_string();
                has_dtype = true;
            } else if (key == "shape" && !has_shape) {
                if (c.peek() != '[') throw_format(path, "tensor '" + name + "': shape is not a list");
                c.expect('[');
                if (!c.take(']')) {
                    do {
                        if (t.shape.size() == kMaxRank)
                            throw_format(path, "tensor '" + name + "': shape has more than " +
                                                   std::to_string(kMaxRank) + " dimensions");
                        t.shape.push_back(u64_field(c, path, name, "shape"));
                    } while (c.next_or_close(']'));
                }
                has_shape = true;
            } else if (key == "data_offsets" && !has_offsets) {
                const std::string bad = "tensor '" + name + "': data_offsets must be [begin, end]";
                if (c.peek() != '[') throw_format(path, bad);
                c.expect('[');
                if (c.take(']')) throw_format(path, bad);
                t.begin = u64_field(c, path, name, "data_offsets");
                if (!c.next_or_close(']')) throw_format(path, bad);
                t.end = u64_field(c, path, name, "data_offsets");
                if (c.next_or_close(']')) throw_format(path, bad);
                has_offsets = true;
            } else {
                // Unknown or repeated fields would be silently dropped by a rewrite, so refuse them instead.
                throw_format(path, "tensor '" + name + "': unexpected or repeated field '" + key + "'");
            }
        } while (c.next_or_close('}'));
    }
    if (!has_dtype || !has_shape || !has_offsets)
        throw_format(path, "tensor '" + name + "': needs dtype, shape and data_offsets");
    return t;
}

// Everything but the end of the data section, which is checked once the tensors are in data order (see below).
void check_tensor(const TensorEntry& t, const std::string& path, uint64_t data_len) {
    const std::string& name = t.name;
    int bits = dtype_bits(t.dtype);
    if (bits == 0) throw_format(path, "tensor '" + name + "': unknown dtype '" + t.dtype + "'");
    if (t.begin > t.end)
        throw_format(path, "tensor '" + name + "': data_offsets [" + std::to_string(t.begin) + ", " +
                               std::to_string(t.end) + "] end before they begin");
    uint64_t elements = 1;
    for (uint64_t d : t.shape)
        if (__builtin_mul_overflow(elements, d, &elements))
            throw_format(path, "tensor '" + name + "': shape overflows 64 bits");
    uint64_t total_bits;
    if (__builtin_mul_overflow(elements, static_cast<uint64_t>(bits), &total_bits) || total_bits % 8 != 0)
        throw_format(path, "tensor '" + name + "': shape does not fill whole bytes for dtype " + t.dtype);
    // An end past the data section is reported as truncation, in data order, rather than as a size mismatch.
    if (t.end <= data_len && total_bits / 8 != t.end - t.begin)
        throw_format(path, "tensor '" + name + "': " + t.dtype + " shape needs " + std::to_string(total_bits / 8) +
                               " bytes but data_offsets span " + std::to_string(t.end - t.begin));
}

ParsedHeader parse_header_file(const std::string& path) {
    Fd f(open_regular(path, O_RDONLY));
    struct stat st;
    if (::fstat(f.fd, &st) != 0) throw_os("cannot stat", path);
    ParsedHeader out;
    out.file_size = static_cast<uint64_t>(st.st_size);
    if (out.file_size < 8) throw_format(path, "file is " + std::to_string(out.file_size) +
                                                  " bytes, too short for the 8-byte header length (truncated?)");
    unsigned char len_bytes[8];
    pread_all(f.fd, reinterpret_cast<char*>(len_bytes), 8, 0, path);
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | len_bytes[i];
    if (n > kMaxHeaderBytes)
        throw_format(path, "header length " + std::to_string(n) + " exceeds the 100 MB safetensors limit");
    if (n > out.file_size - 8)
        throw_format(path, "header length " + std::to_string(n) + " runs past the end of the " +
                               std::to_string(out.file_size) + "-byte file (truncated?)");
    if (n < 2) throw_format(path, "header of " + std::to_string(n) + " bytes cannot hold a JSON object");
    out.header_len = n;
    std::string text(n, '\0');
    pread_all(f.fd, &text[0], n, 8, path);

    if (text.compare(0, 3, "\xEF\xBB\xBF") == 0)
        throw_format(path, "header starts with a UTF-8 byte-order mark, which safetensors refuses; re-save the file");
    long long bad = first_invalid_utf8(text);
    if (bad >= 0) throw_format(path, "header is not valid UTF-8 (byte " + std::to_string(bad) + ")");
    long long deep = first_too_deep(text, kMaxDepth);
    if (deep >= 0)
        throw_format(path, "invalid JSON header at byte " + std::to_string(deep) + ": nesting deeper than " +
                               std::to_string(kMaxDepth));
    JsonCursor c(text, printable(path));
    c.skip_ws();
    if (c.peek() != '{') throw_format(path, "header is not a JSON object");
    c.expect('{');
    const uint64_t data_len = out.file_size - 8 - n;
    std::set<std::string> seen;
    if (!c.take('}')) {
        do {
            std::string name = c.key();
            if (!seen.insert(name).second) throw_format(path, "duplicate entry '" + name + "' in header");
            if (name == "__metadata__") {
                parse_metadata(c, path, out);
                out.has_metadata = true;
                continue;
            }
            TensorEntry t = parse_tensor(c, path, name);
            check_tensor(t, path, data_len);
            out.tensors.push_back(std::move(t));
        } while (c.next_or_close('}'));
    }
    c.skip_ws();
    if (!c.at_end()) c.fail("unexpected data after the JSON value");

    std::sort(out.tensors.begin(), out.tensors.end(), [](const TensorEntry& a, const TensorEntry& b) {
        return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
    });
    uint64_t expected = 0;
    const TensorEntry* previous = nullptr;
    for (auto& t : out.tensors) {
        if (t.begin < expected)
            throw_format(path, "tensor '" + t.name + "' overlaps tensor '" + previous->name + "' (bytes " +
                                   std::to_string(t.begin) + ".." + std::to_string(expected) + ")");
        if (t.begin > expected)
            throw_format(path, "hole of " + std::to_string(t.begin - expected) + " bytes before tensor '" + t.name +
                                   "' at data offset " + std::to_string(expected));
        // In data order, so a truncated file names the tensor the cut falls in, not whichever the JSON lists first.
        if (t.end > data_len)
            throw_format(path, "tensor '" + t.name + "': data_offsets end at " + std::to_string(t.end) +
                                   " but the data section has " + std::to_string(data_len) + " bytes (truncated?)");
        expected = t.end;
        previous = &t;
    }
    if (expected != data_len)
        throw_format(path, std::to_string(data_len - expected) +
                               " trailing bytes after the last tensor; the safetensors reader refuses such files");
    return out;
}

std::string render_header(const std::vector<std::pair<std::string, std::string>>* metadata,
                          const std::vector<TensorEntry>& tensors, uint64_t pad_to) {
    std::string out = "{";
    bool first = true;
    if (metadata) {
        out += "\"__metadata__\":{";
        bool first_meta = true;
        for (auto& kv : *metadata) {
            if (!first_meta) out += ',';
            first_meta = false;
            append_json_string(out, kv.first);
            out += ':';
            append_json_string(out, kv.second);
        }
        out += '}';
        first = false;
    }
    for (auto& t : tensors) {
        if (!first) out += ',';
        first = false;
        append_json_string(out, t.name);
        out += ":{\"dtype\":";
        append_json_string(out, t.dtype);
        out += ",\"shape\":[";
        for (size_t i = 0; i < t.shape.size(); ++i) {
            if (i) out += ',';
            out += std::to_string(t.shape[i]);
        }
        out += "],\"data_offsets\":[" + std::to_string(t.begin) + "," + std::to_string(t.end) + "]}";
    }
    out += '}';
    // Padding to the old length keeps every data offset in the file unchanged; otherwise round up to 8 like the
    // safetensors writer, which keeps the data section aligned for zero-copy loaders.
    uint64_t target = out.size() <= pad_to ? pad_to : (out.size() + 7) / 8 * 8;
    out.append(target - out.size(), ' ');
    return out;
}

std::string header_prefix(const std::string& header) {
    std::string out(8, '\0');
    uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
    return out + header;
}

}  // namespace

// dst = 8-byte length + `header` + the source byte ranges `runs`, through the shared copy path (reflink,
// copy_file_range, read/write).
CopyResult write_shard(const std::string& src_path, const std::string& dst_path, const std::string& header,
                       const std::vector<std::pair<uint64_t, uint64_t>>& runs, bool allow_clone,
                       const std::string& method, bool do_fsync, unsigned mode) {
    return write_file(src_path, dst_path, header_prefix(header), runs, allow_clone, method, do_fsync, mode);
}

// Same-length header rewrite, so the data section stays where it is.
void overwrite_header(const std::string& path, const std::string& header, uint64_t expected_header_len) {
    if (header.size() != expected_header_len)
        throw SafetensorsFormatError(path + ": rewritten header is " + std::to_string(header.size()) +
                                     " bytes but must be exactly " + std::to_string(expected_header_len) +
                                     " to leave the data in place");
    overwrite_prefix(path, header_prefix(header), 8 + expected_header_len);
}

namespace {

py::dict header_to_python(const ParsedHeader& h) {
    py::dict d;
    d["header_len"] = h.header_len;
    d["file_size"] = h.file_size;
    d["data_start"] = h.header_len + 8;
    if (h.has_metadata) {
        py::dict meta;
        for (auto& kv : h.metadata) meta[py::str(kv.first)] = py::str(kv.second);
        d["metadata"] = meta;
    } else {
        d["metadata"] = py::none();
    }
    py::list tensors;
    for (auto& t : h.tensors) {
        py::tuple shape(t.shape.size());
        for (size_t i = 0; i < t.shape.size(); ++i) shape[i] = py::int_(t.shape[i]);
        tensors.append(py::make_tuple(t.name, t.dtype, shape, t.begin, t.end));
    }
    d["tensors"] = tensors;
    return d;
}

}  // namespace
}  // namespace sgf

void register_safetensors_surgery(py::module_& m) {
    using namespace sgf;
    // Registered after FileFormatError (module.cpp), so pybind11 tries this more specific translation first.
    py::register_exception<SafetensorsFormatError>(m, "SafetensorsFormatError", m.attr("FileFormatError"));

    m.def(
        "safetensors_read_header",
        [](const std::string& path) {
            ParsedHeader h;
            {
                py::gil_scoped_release release;
                h = parse_header_file(path);
            }
            return header_to_python(h);
        },
        py::arg("path"),
        "Parse and validate one safetensors file's header. Returns {header_len, file_size, data_start, metadata, "
        "tensors: [(name, dtype, shape, begin, end)] in data order}; raises SafetensorsFormatError (a ValueError) "
        "naming the file and tensor when the file is malformed.");

    m.def(
        "safetensors_render_header",
        [](py::object metadata, const std::vector<std::tuple<std::string, std::string, std::vector<uint64_t>, uint64_t,
                                                             uint64_t>>& tensors,
           uint64_t pad_to) {
            std::vector<std::pair<std::string, std::string>> meta;
            bool has_meta = !metadata.is_none();
            if (has_meta)
                for (auto item : metadata.cast<py::dict>())
                    meta.emplace_back(item.first.cast<std::string>(), item.second.cast<std::string>());
            std::vector<TensorEntry> entries;
            for (auto& t : tensors) {
                TensorEntry e;
                std::tie(e.name, e.dtype, e.shape, e.begin, e.end) = t;
                entries.push_back(std::move(e));
            }
            return py::bytes(render_header(has_meta ? &meta : nullptr, entries, pad_to));
        },
        py::arg("metadata"), py::arg("tensors"), py::arg("pad_to"),
        "Render a header JSON (without the 8-byte length) listing `tensors` in the given order, padded with spaces "
        "to `pad_to` bytes when it fits, else to a multiple of 8.");

    m.def(
        "safetensors_write_shard",
        [](const std::string& src_path, const std::string& dst_path, const py::bytes& header,
           const std::vector<std::pair<uint64_t, uint64_t>>& runs, bool allow_clone, const std::string& method,
           bool do_fsync, unsigned mode) {
            std::string text = header;
            py::gil_scoped_release release;
            CopyResult r = write_shard(src_path, dst_path, text, runs, allow_clone, method, do_fsync, mode);
            return std::make_tuple(r.bytes, r.method);
        },
        py::arg("src_path"), py::arg("dst_path"), py::arg("header"), py::arg("runs"), py::arg("allow_clone") = false,
        py::arg("method") = "auto", py::arg("fsync") = true, py::arg("mode") = 0644,
        "Write dst as the 8-byte length + `header` followed by the source byte ranges `runs` [(offset, length)] in "
        "order. dst must not exist; it is created with permission bits `mode`. Returns (bytes copied, method used: "
        "reflink, copy_file_range, readwrite or none).");

    m.def(
        "safetensors_overwrite_header",
        [](const std::string& path, const py::bytes& header, uint64_t expected_header_len) {
            std::string text = header;
            py::gil_scoped_release release;
            overwrite_header(path, text, expected_header_len);
        },
        py::arg("path"), py::arg("header"), py::arg("expected_header_len"),
        "Overwrite a file's header in place (same length, so the data section stays where it is) and fsync it.");
}
