#pragma once
// GGUF v2/v3 (llama.cpp's model format): a strict reader of the header (metadata key/values and tensor infos) and a
// writer of rewritten headers. Tensor data is never decoded here; the cut moves it with surgery/file_io.h.
//
// Layout: "GGUF", u32 version, u64 tensor count, u64 kv count, kv records, tensor infos, zero padding to
// general.alignment (default 32), then the data section: tensors in info order, each padded to the alignment.
// The reader accepts what llama.cpp's gguf.cpp accepts and refuses the rest with one line naming the file, the key
// or tensor and the problem, without allocating more than the file actually holds.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "surgery/file_io.h"

namespace sgf {
namespace gguf {

struct GgufFormatError : FormatError {
    using FormatError::FormatError;
};

enum ValueType : uint32_t {
    kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7, kString = 8, kArray = 9,
    kU64 = 10, kI64 = 11, kF64 = 12, kNumValueTypes = 13,
};

// Byte size of a fixed-size value type; 0 for string and array.
uint64_t value_size(uint32_t type);
const char* value_type_name(uint32_t type);

// (elements per block, bytes per block) of a ggml tensor type as stored in GGUF files; {0, 0} when unknown.
std::pair<uint64_t, uint64_t> tensor_type_size(uint32_t type);
std::string tensor_type_name(uint32_t type);

// A decoded scalar or array element: numbers as int64/uint64/double, strings as raw bytes.
struct Scalar {
    uint32_t type = 0;
    int64_t i = 0;
    uint64_t u = 0;
    double f = 0;
    std::string s;
};

struct KeyValue {
    std::string key;
    uint32_t type = 0;       // a ValueType
    uint32_t elem_type = 0;  // arrays: the element type (nested arrays are refused, as in llama.cpp)
    uint64_t count = 0;      // arrays: the element count
    uint64_t record_begin = 0, record_end = 0;  // the whole record in the file, key length first
    std::vector<Scalar> values;  // scalars: one; arrays: decoded when short (per-layer arrays), else empty
    bool decoded = false;
};

struct TensorInfo {
    std::string name;
    std::vector<uint64_t> dims;  // ggml order: dims[0] is the contiguous one
    uint32_t type = 0;
    uint64_t offset = 0;  // relative to the data section
    uint64_t nbytes = 0;  // without the alignment padding
};

struct GgufFile {
    uint32_t version = 0;
    uint64_t alignment = 32;
    uint64_t file_size = 0;
    uint64_t header_end = 0;   // end of the last tensor info
    uint64_t data_start = 0;   // header_end rounded up to the alignment
    uint64_t data_size = 0;    // the data section, each tensor padded
    std::vector<KeyValue> kvs;
    std::vector<TensorInfo> tensors;
};

// Arrays longer than this keep only their count and raw bytes (tokenizer vocabularies); per-layer arrays are far
// shorter (llama.cpp caps layers at 512).
constexpr uint64_t kMaxDecodedArray = 65536;

GgufFile parse_file(const std::string& path);

// One kv record (key length, key, type, value) for a scalar or a flat array of `elem_type`.
std::string encode_record(const std::string& key, uint32_t type, uint32_t elem_type, const std::vector<Scalar>& values);

// The header of a file: magic, version, counts, the given kv records verbatim, the tensor infos, zero padding to
// `alignment`. Refuses tensor offsets that do not follow each other in order, each padded to the alignment.
std::string render_header(uint32_t version, const std::vector<std::string>& kv_records,
                          const std::vector<TensorInfo>& tensors, uint64_t alignment);

}  // namespace gguf
}  // namespace sgf
