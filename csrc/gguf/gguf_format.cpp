// Strict GGUF header reader and header writer; see gguf_format.h.
#include "gguf/gguf_format.h"

#include <fcntl.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <set>

namespace sgf {
namespace gguf {
namespace {

// llama.cpp's limits (GGML_MAX_NAME, GGML_MAX_DIMS): a file beyond them cannot load there, so it is refused here.
constexpr size_t kMaxNameBytes = 64;
constexpr uint32_t kMaxDims = 4;
// Real files hold tens of keys and at most a few thousand tensors; the caps only bound what a hostile count can make
// this reader loop over before the bytes run out.
constexpr uint64_t kMaxKeyValues = 1u << 16;
constexpr uint64_t kMaxTensors = 1u << 20;
// Strings in keys and values: a key is short; a value (chat template, a tokenizer's merges entry) can be long.
constexpr uint64_t kMaxKeyBytes = 1u << 16;
// The header is read through one window of this size, so memory does not grow with a hostile length.
constexpr size_t kWindowBytes = 1u << 20;

[[noreturn]] void fail(const std::string& path, const std::string& why) {
    throw GgufFormatError(printable(path + ": " + why));
}

// Sequential reader over pread with a bounded window; every read names what it was reading when the file ends.
class Reader {
  public:
    Reader(int fd, uint64_t size, const std::string& path) : fd_(fd), size_(size), path_(path) {}

    uint64_t pos() const { return pos_; }
    uint64_t remaining() const { return size_ - pos_; }

    void read(void* out, uint64_t n, const std::string& what) {
        if (n > remaining())
            fail(path_, what + " needs " + std::to_string(n) + " bytes at offset " + std::to_string(pos_) +
                            " but the file ends at " + std::to_string(size_) + " (truncated?)");
        char* dst = static_cast<char*>(out);
        while (n > 0) {
            if (pos_ < win_begin_ || pos_ >= win_begin_ + window_.size()) fill();
            uint64_t in_window = win_begin_ + window_.size() - pos_;
            uint64_t take = std::min<uint64_t>(n, in_window);
            std::memcpy(dst, window_.data() + (pos_ - win_begin_), take);
            dst += take;
            pos_ += take;
            n -= take;
        }
    }

    void skip(uint64_t n, const std::string& what) {
        if (n > remaining())
            fail(path_, what + " needs " + std::to_string(n) + " bytes at offset " + std::to_string(pos_) +
                            " but the file ends at " + std::to_string(size_) + " (truncated?)");
        pos_ += n;
    }

    template <typename T>
    T get(const std::string& what) {
        T v;
        read(&v, sizeof(T), what);
        return v;
    }

    std::string string(uint64_t max_len, const std::string& what) {
        uint64_t n = get<uint64_t>(what + " length");
        if (n > remaining())
            fail(path_, what + " claims " + std::to_string(n) + " bytes but only " + std::to_string(remaining()) +
                            " remain in the file (truncated or corrupt)");
        if (n > max_len)
            fail(path_, what + " is " + std::to_string(n) + " bytes, more than the " + std::to_string(max_len) +
                            " allowed");
        std::string s(n, '\0');
        read(&s[0], n, what);
        return s;
    }

  private:
    void fill() {
        win_begin_ = pos_;
        size_t n = static_cast<size_t>(std::min<uint64_t>(kWindowBytes, size_ - pos_));
        window_.resize(n);
        pread_all(fd_, window_.data(), n, pos_, path_);
    }

    int fd_;
    uint64_t size_;
    std::string path_;
    uint64_t pos_ = 0;
    uint64_t win_begin_ = 0;
    std::vector<char> window_;
};

bool has_control(const std::string& s) {
    for (unsigned char c : s)
        if (c < 0x20 || c == 0x7f) return true;
    return false;
}

Scalar read_scalar(Reader& r, uint32_t type, const std::string& what, bool keep_string) {
    Scalar v;
    v.type = type;
    switch (type) {
        case kU8: v.u = r.get<uint8_t>(what); v.i = static_cast<int64_t>(v.u); break;
        case kI8: v.i = r.get<int8_t>(what); break;
        case kU16: v.u = r.get<uint16_t>(what); v.i = static_cast<int64_t>(v.u); break;
        case kI16: v.i = r.get<int16_t>(what); break;
        case kU32: v.u = r.get<uint32_t>(what); v.i = static_cast<int64_t>(v.u); break;
        case kI32: v.i = r.get<int32_t>(what); break;
        case kU64: v.u = r.get<uint64_t>(what); break;
        case kI64: v.i = r.get<int64_t>(what); break;
        case kF32: v.f = r.get<float>(what); break;
        case kF64: v.f = r.get<double>(what); break;
        case kBool: {
            uint8_t b = r.get<uint8_t>(what);
            // llama.cpp reads any nonzero byte as true; a rewrite would normalise it, so only 0 and 1 are exact.
            if (b > 1) throw GgufFormatError(what + " is a bool holding " + std::to_string(b) + ", not 0 or 1");
            v.u = b;
            v.i = b;
            break;
        }
        case kString: {
            if (keep_string) {
                v.s = r.string(UINT64_MAX, what);
            } else {
                uint64_t n = r.get<uint64_t>(what + " length");
                r.skip(n, what);
            }
            break;
        }
        default:
            throw GgufFormatError(what + " has unknown value type " + std::to_string(type));
    }
    return v;
}

void put_u32(std::string& out, uint32_t v) { out.append(reinterpret_cast<const char*>(&v), 4); }
void put_u64(std::string& out, uint64_t v) { out.append(reinterpret_cast<const char*>(&v), 8); }

void put_string(std::string& out, const std::string& s) {
    put_u64(out, s.size());
    out += s;
}

void put_scalar(std::string& out, uint32_t type, const Scalar& v) {
    auto put = [&out](auto x) { out.append(reinterpret_cast<const char*>(&x), sizeof(x)); };
    switch (type) {
        case kU8: put(static_cast<uint8_t>(v.u)); break;
        case kI8: put(static_cast<int8_t>(v.i)); break;
        case kU16: put(static_cast<uint16_t>(v.u)); break;
        case kI16: put(static_cast<int16_t>(v.i)); break;
        case kU32: put(static_cast<uint32_t>(v.u)); break;
        case kI32: put(static_cast<int32_t>(v.i)); break;
        case kU64: put(static_cast<uint64_t>(v.u)); break;
        case kI64: put(static_cast<int64_t>(v.i)); break;
        case kF32: put(static_cast<float>(v.f)); break;
        case kF64: put(static_cast<double>(v.f)); break;
        case kBool: put(static_cast<uint8_t>(v.u != 0)); break;
        case kString: put_string(out, v.s); break;
        default: throw std::invalid_argument("cannot encode GGUF value type " + std::to_string(type));
    }
}

uint64_t pad_to(uint64_t n, uint64_t alignment) { return (n + alignment - 1) / alignment * alignment; }

}  // namespace

uint64_t value_size(uint32_t type) {
    switch (type) {
        case kU8: case kI8: case kBool: return 1;
        case kU16: case kI16: return 2;
        case kU32: case kI32: case kF32: return 4;
        case kU64: case kI64: case kF64: return 8;
        default: return 0;
    }
}

const char* value_type_name(uint32_t type) {
    static const char* names[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array",
                                  "u64", "i64", "f64"};
    return type < kNumValueTypes ? names[type] : "unknown";
}

// The ggml types a GGUF file may hold (ggml.h's enum with gguf-py's GGML_QUANT_SIZES). Removed types (4, 5, 31-33,
// 36-38) and Q8_1 (an activation-only type, never stored) are unknown on purpose.
static const std::map<uint32_t, std::tuple<const char*, uint64_t, uint64_t>>& type_table() {
    static const std::map<uint32_t, std::tuple<const char*, uint64_t, uint64_t>> table = {
        {0, {"F32", 1, 4}},        {1, {"F16", 1, 2}},         {2, {"Q4_0", 32, 18}},     {3, {"Q4_1", 32, 20}},
        {6, {"Q5_0", 32, 22}},     {7, {"Q5_1", 32, 24}},      {8, {"Q8_0", 32, 34}},     {10, {"Q2_K", 256, 84}},
        {11, {"Q3_K", 256, 110}},  {12, {"Q4_K", 256, 144}},   {13, {"Q5_K", 256, 176}},  {14, {"Q6_K", 256, 210}},
        {15, {"Q8_K", 256, 292}},  {16, {"IQ2_XXS", 256, 66}}, {17, {"IQ2_XS", 256, 74}}, {18, {"IQ3_XXS", 256, 98}},
        {19, {"IQ1_S", 256, 50}},  {20, {"IQ4_NL", 32, 18}},   {21, {"IQ3_S", 256, 110}}, {22, {"IQ2_S", 256, 82}},
        {23, {"IQ4_XS", 256, 136}}, {24, {"I8", 1, 1}},        {25, {"I16", 1, 2}},       {26, {"I32", 1, 4}},
        {27, {"I64", 1, 8}},       {28, {"F64", 1, 8}},        {29, {"IQ1_M", 256, 56}},  {30, {"BF16", 1, 2}},
        {34, {"TQ1_0", 256, 54}},  {35, {"TQ2_0", 256, 66}},   {39, {"MXFP4", 32, 17}},   {40, {"NVFP4", 64, 36}},
        {41, {"Q1_0", 128, 18}},
    };
    return table;
}

std::pair<uint64_t, uint64_t> tensor_type_size(uint32_t type) {
    auto it = type_table().find(type);
    if (it == type_table().end()) return {0, 0};
    return {std::get<1>(it->second), std::get<2>(it->second)};
}

std::string tensor_type_name(uint32_t type) {
    auto it = type_table().find(type);
    return it == type_table().end() ? "type " + std::to_string(type) : std::get<0>(it->second);
}

GgufFile parse_file(const std::string& path) {
    Fd f(open_regular(path, O_RDONLY));
    GgufFile out;
    out.file_size = file_size(f.fd, path);
    Reader r(f.fd, out.file_size, path);
    char magic[4];
    r.read(magic, 4, "the GGUF magic");
    if (std::memcmp(magic, "GGUF", 4) != 0) fail(path, "does not start with the GGUF magic; it is not a GGUF file");
    out.version = r.get<uint32_t>("the GGUF version");
    if (out.version != 2 && out.version != 3)
        fail(path, "is GGUF version " + std::to_string(out.version) + "; only versions 2 and 3 are supported");
    uint64_t n_tensors = r.get<uint64_t>("the tensor count");
    uint64_t n_kv = r.get<uint64_t>("the metadata count");
    // The smallest kv record is 13 bytes and the smallest tensor info 24: counts that cannot fit are refused before
    // anything is allocated for them.
    if (n_kv > kMaxKeyValues || n_kv * 13 > r.remaining())
        fail(path, "claims " + std::to_string(n_kv) + " metadata entries, more than the file can hold (corrupt)");
    if (n_tensors > kMaxTensors || n_tensors * 24 > r.remaining())
        fail(path, "claims " + std::to_string(n_tensors) + " tensors, more than the file can hold (corrupt)");

    std::set<std::string> keys;
    for (uint64_t i = 0; i < n_kv; ++i) {
        KeyValue kv;
        kv.record_begin = r.pos();
        std::string where = "metadata entry " + std::to_string(i);
        kv.key = r.string(kMaxKeyBytes, where + " key");
        if (kv.key.empty()) fail(path, where + " has an empty key");
        if (has_control(kv.key)) fail(path, where + " key '" + kv.key + "' contains control characters");
        if (!keys.insert(kv.key).second) fail(path, "duplicate metadata key '" + kv.key + "'");
        where = "metadata '" + kv.key + "'";
        kv.type = r.get<uint32_t>(where + " type");
        try {
            if (kv.type == kArray) {
                kv.elem_type = r.get<uint32_t>(where + " element type");
                kv.count = r.get<uint64_t>(where + " element count");
                if (kv.elem_type == kArray)
                    fail(path, where + " is an array of arrays, which llama.cpp refuses");
                if (kv.elem_type >= kNumValueTypes)
                    fail(path, where + " has unknown element type " + std::to_string(kv.elem_type));
                uint64_t size = value_size(kv.elem_type);
                // Fixed-size elements: the count must fit in what is left; strings need at least 8 bytes each.
                uint64_t least = size ? size : 8;
                if (kv.count > r.remaining() / least)
                    fail(path, where + " claims " + std::to_string(kv.count) + " elements, more than the remaining " +
                                   std::to_string(r.remaining()) + " bytes hold (truncated or corrupt)");
                kv.decoded = kv.count <= kMaxDecodedArray && kv.elem_type != kString;
                if (kv.decoded) {
                    kv.values.reserve(kv.count);
                    for (uint64_t j = 0; j < kv.count; ++j)
                        kv.values.push_back(read_scalar(r, kv.elem_type, where + " element", false));
                } else if (size) {
                    r.skip(kv.count * size, where);
                } else {
                    for (uint64_t j = 0; j < kv.count; ++j) read_scalar(r, kString, where + " element", false);
                }
            } else if (kv.type < kNumValueTypes) {
                kv.values.push_back(read_scalar(r, kv.type, where, true));
                kv.decoded = true;
            } else {
                fail(path, where + " has unknown value type " + std::to_string(kv.type));
            }
        } catch (const GgufFormatError& e) {
            std::string msg = e.what();
            if (msg.rfind(printable(path), 0) == 0) throw;
            fail(path, msg);
        }
        kv.record_end = r.pos();
        out.kvs.push_back(std::move(kv));
    }
    for (auto& kv : out.kvs) {
        if (kv.key != "general.alignment") continue;
        if (kv.type != kU32) fail(path, "general.alignment must be a u32, not " + std::string(value_type_name(kv.type)));
        uint64_t a = kv.values[0].u;
        if (a == 0 || (a & (a - 1)) != 0) fail(path, "general.alignment " + std::to_string(a) + " is not a power of 2");
        out.alignment = a;
    }

    std::set<std::string> names;
    for (uint64_t i = 0; i < n_tensors; ++i) {
        TensorInfo t;
        std::string where = "tensor info " + std::to_string(i);
        t.name = r.string(kMaxNameBytes - 1, where + " name");
        if (t.name.empty()) fail(path, where + " has an empty name");
        if (has_control(t.name)) fail(path, where + " name '" + t.name + "' contains control characters");
        if (!names.insert(t.name).second) fail(path, "duplicate tensor name '" + t.name + "'");
        where = "tensor '" + t.name + "'";
        uint32_t n_dims = r.get<uint32_t>(where + " dimension count");
        if (n_dims == 0 || n_dims > kMaxDims)
            fail(path, where + " has " + std::to_string(n_dims) + " dimensions; GGUF tensors have 1 to 4");
        uint64_t elements = 1;
        for (uint32_t d = 0; d < n_dims; ++d) {
            uint64_t dim = r.get<uint64_t>(where + " shape");
            if (dim > static_cast<uint64_t>(INT64_MAX))
                fail(path, where + " dimension " + std::to_string(d) + " is negative as int64");
            if (__builtin_mul_overflow(elements, dim, &elements) || elements > static_cast<uint64_t>(INT64_MAX))
                fail(path, where + " has more elements than int64 holds");
            t.dims.push_back(dim);
        }
        t.type = r.get<uint32_t>(where + " type");
        auto [block, bytes] = tensor_type_size(t.type);
        if (block == 0) fail(path, where + " has unknown or removed ggml type " + std::to_string(t.type));
        if (t.dims[0] % block != 0)
            fail(path, where + " of type " + tensor_type_name(t.type) + " has rows of " + std::to_string(t.dims[0]) +
                           " elements, not a multiple of its block size " + std::to_string(block));
        if (__builtin_mul_overflow(elements / block, bytes, &t.nbytes))
            fail(path, where + " size in bytes overflows 64 bits");
        t.offset = r.get<uint64_t>(where + " offset");
        out.tensors.push_back(std::move(t));
    }
    out.header_end = r.pos();
    out.data_start = n_tensors ? pad_to(out.header_end, out.alignment) : out.header_end;

    uint64_t expected = 0;
    for (auto& t : out.tensors) {
        if (t.offset % out.alignment != 0)
            fail(path, "tensor '" + t.name + "' offset " + std::to_string(t.offset) + " is not a multiple of the " +
                           std::to_string(out.alignment) + "-byte alignment");
        if (t.offset < expected)
            fail(path, "tensor '" + t.name + "' at offset " + std::to_string(t.offset) +
                           " overlaps the tensor before it, which ends at " + std::to_string(expected));
        if (t.offset > expected)
            fail(path, "tensor '" + t.name + "' at offset " + std::to_string(t.offset) + " leaves a gap after the " +
                           "tensor before it (expected " + std::to_string(expected) +
                           "); llama.cpp needs tensors stored in order, each padded to the alignment");
        uint64_t padded;
        if (t.nbytes > UINT64_MAX - out.alignment || __builtin_add_overflow(expected, pad_to(t.nbytes, out.alignment),
                                                                            &padded))
            fail(path, "tensor '" + t.name + "' ends past 64-bit offsets");
        if (out.data_start + padded < out.data_start || out.data_start + padded > out.file_size)
            fail(path, "tensor '" + t.name + "' ends at byte " + std::to_string(out.data_start + padded) +
                           " but the file has " + std::to_string(out.file_size) + " (truncated?)");
        expected = padded;
    }
    out.data_size = expected;
    uint64_t end = out.data_start + out.data_size;
    // A file without tensors may or may not pad its header; anything else after the data is unaccounted for.
    bool tensorless_pad = n_tensors == 0 && out.file_size == pad_to(out.header_end, out.alignment);
    if (out.file_size != end && !tensorless_pad) {
        if (out.file_size < end) fail(path, "data section ends past the end of the file (truncated?)");
        fail(path, std::to_string(out.file_size - end) + " trailing bytes after the last tensor's data");
    }
    return out;
}

std::string encode_record(const std::string& key, uint32_t type, uint32_t elem_type, const std::vector<Scalar>& values) {
    std::string out;
    put_string(out, key);
    put_u32(out, type);
    if (type == kArray) {
        if (elem_type == kArray || elem_type >= kNumValueTypes)
            throw std::invalid_argument("cannot encode an array of GGUF type " + std::to_string(elem_type));
        put_u32(out, elem_type);
        put_u64(out, values.size());
        for (auto& v : values) put_scalar(out, elem_type, v);
    } else {
        if (values.size() != 1) throw std::invalid_argument("a GGUF scalar needs exactly one value");
        put_scalar(out, type, values[0]);
    }
    return out;
}

std::string render_header(uint32_t version, const std::vector<std::string>& kv_records,
                          const std::vector<TensorInfo>& tensors, uint64_t alignment) {
    if (alignment == 0 || (alignment & (alignment - 1)) != 0)
        throw std::invalid_argument("alignment must be a power of 2");
    std::string out = "GGUF";
    put_u32(out, version);
    put_u64(out, tensors.size());
    put_u64(out, kv_records.size());
    for (auto& rec : kv_records) out += rec;
    uint64_t expected = 0;
    for (auto& t : tensors) {
        if (t.offset != expected)
            throw std::invalid_argument("tensor '" + printable(t.name) + "' offset " + std::to_string(t.offset) +
                                        " does not follow the tensor before it (expected " +
                                        std::to_string(expected) + ")");
        put_string(out, t.name);
        put_u32(out, static_cast<uint32_t>(t.dims.size()));
        for (uint64_t d : t.dims) put_u64(out, d);
        put_u32(out, t.type);
        put_u64(out, t.offset);
        expected += pad_to(t.nbytes, alignment);
    }
    out.append(pad_to(out.size(), alignment) - out.size(), '\0');
    return out;
}

}  // namespace gguf
}  // namespace sgf
