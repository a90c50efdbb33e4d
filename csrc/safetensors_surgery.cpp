// safetensors checkpoint surgery: validate shard headers, render rewritten headers, and move tensor bytes between
// files without ever holding more than a header plus a fixed buffer in memory.
//
// Python (shortgpt_fast/surgery/checkpoint.py) decides *what* to write; this file only checks inputs and does I/O.
// Every function releases the GIL while it touches the disk, and every failure is a one-line message that names the
// file (and the tensor, where there is one).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "safetensors_json.h"

namespace py = pybind11;

namespace sgf {
namespace {

// The safetensors reader refuses larger headers, so anything bigger is hostile or corrupt and must not be allocated.
constexpr uint64_t kMaxHeaderBytes = 100ull * 1000 * 1000;
// The fallback copy loop's only buffer; memory use stays flat whatever the checkpoint size.
constexpr size_t kCopyBufferBytes = 8u << 20;
// copy_file_range is asked for at most this much per call, so a kill-after-k-writes test hook has points to hit
// inside large tensors and the kernel never pins one huge request.
constexpr size_t kCopyChunkBytes = 64u << 20;

struct OsError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

[[noreturn]] void throw_os(const std::string& what, const std::string& path) {
    throw OsError(what + " " + path + ": " + std::strerror(errno));
}

// Tensor names come from untrusted headers; control characters in them would break the one-line error contract.
std::string printable(const std::string& text) {
    static const char* hex = "0123456789abcdef";
    std::string out;
    out.reserve(text.size());
    for (unsigned char c : text) {
        if (c == '\n') {
            out += "\\n";
        } else if (c < 0x20 || c == 0x7f) {
            out += "\\x";
            out += hex[c >> 4];
            out += hex[c & 15];
        } else {
            out += static_cast<char>(c);
        }
    }
    return out;
}

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

// Test hook for crash-safety tests: SIGKILL this process after the k-th write, so a test can stop the surgery in
// the middle of a shard and then prove that rerunning completes it. Read once; unset in normal use.
long long kill_after_writes() {
    static long long limit = [] {
        const char* v = std::getenv("SHORTGPT_FAST_SURGERY_KILL_AFTER_WRITES");
        return v ? std::atoll(v) : -1LL;
    }();
    return limit;
}

void count_write() {
    static long long done = 0;
    long long limit = kill_after_writes();
    if (limit >= 0 && ++done > limit) ::kill(::getpid(), SIGKILL);
}

struct Fd {
    int fd = -1;
    Fd() = default;
    explicit Fd(int f) : fd(f) {}
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
    ~Fd() {
        if (fd >= 0) ::close(fd);
    }
};

void pread_all(int fd, char* buf, size_t n, uint64_t off, const std::string& path) {
    while (n > 0) {
        ssize_t got = ::pread(fd, buf, n, static_cast<off_t>(off));
        if (got < 0) {
            if (errno == EINTR) continue;
            throw_os("cannot read", path);
        }
        if (got == 0) throw_format(path, "file ended while reading (truncated?)");
        buf += got;
        n -= static_cast<size_t>(got);
        off += static_cast<uint64_t>(got);
    }
}

void pwrite_all(int fd, const char* buf, size_t n, uint64_t off, const std::string& path) {
    while (n > 0) {
        ssize_t put = ::pwrite(fd, buf, n, static_cast<off_t>(off));
        if (put < 0) {
            if (errno == EINTR) continue;
            throw_os("cannot write", path);
        }
        buf += put;
        n -= static_cast<size_t>(put);
        off += static_cast<uint64_t>(put);
    }
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

// Opens a file the cut reads or edits. O_NOFOLLOW: Python resolves and vets links itself, so a link here was swapped
// in behind its back. O_NONBLOCK: opening a FIFO for reading would otherwise wait forever for a writer; the type check
// right after refuses it (and devices) before anything is read.
int open_regular(const std::string& path, int flags) {
    int fd = ::open(path.c_str(), flags | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
    if (fd < 0) {
        if (errno == ELOOP) throw_format(path, "is a symlink; refusing to follow it");
        throw_os("cannot open", path);
    }
    struct stat st;
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ::close(fd);
        throw_format(path, "is not a regular file (a FIFO, device, socket or folder); refusing to open it");
    }
    // Regular files ignore O_NONBLOCK, but clear it so nothing depends on that.
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    return fd;
}

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

// Copy `len` bytes from src_off to dst_off. Tries copy_file_range (in-kernel, reflinks on CoW filesystems); falls
// back for good to a pread/pwrite loop when the kernel or filesystem pair refuses it.
struct Copier {
    std::string method;  // "auto", "copy_file_range" or "readwrite"
    bool kernel_copy_ok = true;
    std::vector<char> buffer;
    uint64_t bytes = 0;
    std::string used;

    explicit Copier(std::string m) : method(std::move(m)) { kernel_copy_ok = method != "readwrite"; }

    void copy(int src, int dst, uint64_t src_off, uint64_t dst_off, uint64_t len, const std::string& src_path,
              const std::string& dst_path) {
        while (len > 0 && kernel_copy_ok) {
            loff_t so = static_cast<loff_t>(src_off), d = static_cast<loff_t>(dst_off);
            size_t want = static_cast<size_t>(std::min<uint64_t>(len, kCopyChunkBytes));
            ssize_t got = ::copy_file_range(src, &so, dst, &d, want, 0);
            if (got < 0) {
                if (errno == EINTR) continue;
                if (method == "auto" && (errno == EXDEV || errno == ENOSYS || errno == EOPNOTSUPP || errno == EINVAL ||
                                         errno == EIO || errno == ETXTBSY)) {
                    kernel_copy_ok = false;
                    break;
                }
                throw_os("copy_file_range failed from " + src_path + " to", dst_path);
            }
            if (got == 0) throw_format(src_path, "file ended while copying tensor data (truncated?)");
            count_write();
            used = "copy_file_range";
            src_off += static_cast<uint64_t>(got);
            dst_off += static_cast<uint64_t>(got);
            len -= static_cast<uint64_t>(got);
            bytes += static_cast<uint64_t>(got);
        }
        if (len == 0) return;
        if (buffer.empty()) buffer.resize(kCopyBufferBytes);
        used = "readwrite";
        while (len > 0) {
            size_t want = static_cast<size_t>(std::min<uint64_t>(len, buffer.size()));
            pread_all(src, buffer.data(), want, src_off, src_path);
            pwrite_all(dst, buffer.data(), want, dst_off, dst_path);
            count_write();
            src_off += want;
            dst_off += want;
            len -= want;
            bytes += want;
        }
    }
};

std::string header_prefix(const std::string& header) {
    std::string out(8, '\0');
    uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
    return out + header;
}

void fsync_or_throw(int fd, const std::string& path) {
    if (::fsync(fd) != 0) throw_os("cannot fsync", path);
}

// Remove byte ranges from a file without moving the bytes around them, with FALLOC_FL_COLLAPSE_RANGE (ext4, XFS):
// the filesystem drops whole blocks from the extent map, so the cost does not grow with the data after the hole.
// Collapse needs a block-aligned offset and length; a hole whose length is a multiple of the block size but whose
// start is not is handled by first copying the (< 1 block) tail of the kept data before it into the end of the hole,
// then collapsing from the block boundary. Holes are removed last to first, so earlier offsets stay valid, and each
// removal shrinks the file, so the file size alone tells how many removals a killed run completed: rerunning the
// same call resumes exactly where it stopped.
void remove_ranges(const std::string& path, const std::vector<std::pair<uint64_t, uint64_t>>& holes,
                   uint64_t original_size) {
    Fd f(open_regular(path, O_RDWR));
    struct statfs fs;
    if (::fstatfs(f.fd, &fs) != 0) throw_os("cannot statfs", path);
    const uint64_t block = static_cast<uint64_t>(fs.f_bsize);
    // size_before[i]: the file size just before hole i (counting from the end) is removed.
    std::vector<uint64_t> size_before(holes.size());
    uint64_t size = original_size, prev_start = original_size;
    for (size_t k = holes.size(); k-- > 0;) {
        auto [start, end] = holes[k];
        if (!(start < end && end <= prev_start))
            throw std::invalid_argument(path + ": ranges to remove must be non-empty, sorted and disjoint");
        if (end != size && (end - start) % block != 0)
            throw std::invalid_argument(path + ": range length " + std::to_string(end - start) +
                                        " is not a multiple of the filesystem block (" + std::to_string(block) + ")");
        size_before[k] = size;
        size -= end - start;
        prev_start = start;
    }
    struct stat st;
    if (::fstat(f.fd, &st) != 0) throw_os("cannot stat", path);
    uint64_t current = static_cast<uint64_t>(st.st_size);
    if (current != size && std::find(size_before.begin(), size_before.end(), current) == size_before.end())
        throw_format(path, "is " + std::to_string(current) + " bytes, which matches no step of this cut; it was "
                                                             "changed outside the cut");
    std::vector<char> tail(block);
    for (size_t k = holes.size(); k-- > 0;) {
        if (current != size_before[k]) continue;  // removed by an earlier, interrupted run
        auto [start, end] = holes[k];
        if (end == current) {
            if (::ftruncate(f.fd, static_cast<off_t>(start)) != 0) throw_os("cannot truncate", path);
        } else {
            uint64_t aligned = start - start % block, shift = start - aligned;
            if (shift > 0) {
                // The tail goes into the part of the hole that survives the collapse; repeating it is harmless.
                pread_all(f.fd, tail.data(), shift, aligned, path);
                pwrite_all(f.fd, tail.data(), shift, end - shift, path);
                count_write();
                if (::fdatasync(f.fd) != 0) throw_os("cannot fsync", path);
            }
            if (::fallocate(f.fd, FALLOC_FL_COLLAPSE_RANGE, static_cast<off_t>(aligned),
                            static_cast<off_t>(end - start)) != 0)
                throw_os("cannot collapse a byte range of", path);
        }
        fsync_or_throw(f.fd, path);
        count_write();
        current -= holes[k].second - holes[k].first;
    }
}

// Whether `directory`'s filesystem can collapse ranges, and its block size; probed on a scratch file because
// support depends on the filesystem and mount, not the kernel alone.
std::pair<bool, uint64_t> collapse_support(const std::string& directory) {
    std::string probe = directory + "/.shortgpt_fast-collapse-probe";
    // The name is fixed so a killed run's probe is found again; O_EXCL | O_NOFOLLOW after removing it means a
    // planted link or file of that name is never written through. Any failure just means "no collapse".
    ::unlink(probe.c_str());
    Fd f(::open(probe.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
    if (f.fd < 0) return {false, 0};
    struct statfs fs;
    bool ok = ::fstatfs(f.fd, &fs) == 0;
    uint64_t block = ok ? static_cast<uint64_t>(fs.f_bsize) : 0;
    if (ok) {
        std::vector<char> zeros(3 * block, 0);
        ok = ::pwrite(f.fd, zeros.data(), zeros.size(), 0) == static_cast<ssize_t>(zeros.size()) &&
             ::fallocate(f.fd, FALLOC_FL_COLLAPSE_RANGE, static_cast<off_t>(block), static_cast<off_t>(block)) == 0;
    }
    ::unlink(probe.c_str());
    return {ok, block};
}

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
    py::register_exception<SafetensorsFormatError>(m, "SafetensorsFormatError", PyExc_ValueError);
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const OsError& e) {
            PyErr_SetString(PyExc_OSError, e.what());
        }
    });

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
        [](const std::string& src_path, const std::string& dst_path, const py::bytes& header_obj,
           const std::vector<std::pair<uint64_t, uint64_t>>& runs, bool allow_clone, const std::string& method,
           bool do_fsync, unsigned mode) {
            std::string header = header_obj;
            if (method != "auto" && method != "copy_file_range" && method != "readwrite")
                throw std::invalid_argument("copy method must be auto, copy_file_range or readwrite, got " + method);
            Copier copier(method);
            {
                py::gil_scoped_release release;
                Fd src(open_regular(src_path, O_RDONLY));
                // O_EXCL | O_NOFOLLOW: the caller removes its own stale temp file first, so anything already at
                // this name (a planted symlink to a file outside the checkpoint) is refused, never written through.
                Fd dst(::open(dst_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
                if (dst.fd < 0) throw_os("cannot create", dst_path);
                // The result keeps the source's permissions (a 0600 shard must not come out world-readable);
                // fchmod, not the open() mode, because open() applies the umask.
                if (::fchmod(dst.fd, static_cast<mode_t>(mode & 07777)) != 0) throw_os("cannot chmod", dst_path);
                std::string prefix = header_prefix(header);
                uint64_t total = prefix.size();
                for (auto& r : runs) total += r.second;
                bool cloned = false;
                // A whole-file reflink shares every data extent for free; only the header block is then rewritten.
                if (allow_clone && method == "auto" && ::ioctl(dst.fd, FICLONE, src.fd) == 0) {
                    struct stat st;
                    if (::fstat(dst.fd, &st) != 0) throw_os("cannot stat", dst_path);
                    if (static_cast<uint64_t>(st.st_size) == total) {
                        cloned = true;
                        copier.used = "reflink";
                    } else if (::ftruncate(dst.fd, 0) != 0) {
                        throw_os("cannot truncate", dst_path);
                    }
                }
                pwrite_all(dst.fd, prefix.data(), prefix.size(), 0, dst_path);
                count_write();
                if (!cloned) {
                    uint64_t dst_off = prefix.size();
                    // Neighbouring runs are merged so a shard that lost one tensor still moves in a few large calls.
                    size_t i = 0;
                    while (i < runs.size()) {
                        uint64_t start = runs[i].first, len = runs[i].second;
                        while (i + 1 < runs.size() && runs[i + 1].first == start + len) len += runs[++i].second;
                        copier.copy(src.fd, dst.fd, start, dst_off, len, src_path, dst_path);
                        dst_off += len;
                        ++i;
                    }
                    if (::ftruncate(dst.fd, static_cast<off_t>(total)) != 0) throw_os("cannot truncate", dst_path);
                }
                if (do_fsync) {
                    fsync_or_throw(dst.fd, dst_path);
                } else {
                    // Start writeback now without waiting for it, so the caller's later fsync overlaps with copying
                    // the next shard instead of serialising after it. Only a hint: failure changes nothing.
                    ::sync_file_range(dst.fd, 0, 0, SYNC_FILE_RANGE_WRITE);
                }
            }
            return py::make_tuple(copier.bytes, copier.used.empty() ? std::string("none") : copier.used);
        },
        py::arg("src_path"), py::arg("dst_path"), py::arg("header"), py::arg("runs"), py::arg("allow_clone") = false,
        py::arg("method") = "auto", py::arg("fsync") = true, py::arg("mode") = 0644,
        "Write dst as the 8-byte length + `header` followed by the source byte ranges `runs` [(offset, length)] in "
        "order. dst must not exist; it is created with permission bits `mode`. Returns (bytes copied, method used: "
        "reflink, copy_file_range, readwrite or none).");

    m.def(
        "safetensors_overwrite_header",
        [](const std::string& path, const py::bytes& header_obj, uint64_t expected_header_len) {
            std::string header = header_obj;
            if (header.size() != expected_header_len)
                throw SafetensorsFormatError(path + ": rewritten header is " + std::to_string(header.size()) +
                                             " bytes but must be exactly " + std::to_string(expected_header_len) +
                                             " to leave the data in place");
            py::gil_scoped_release release;
            Fd f(open_regular(path, O_WRONLY));
            struct stat st;
            if (::fstat(f.fd, &st) != 0) throw_os("cannot stat", path);
            if (static_cast<uint64_t>(st.st_size) < 8 + expected_header_len)
                throw_format(path, "file is shorter than its header; refusing to write into it");
            std::string prefix = header_prefix(header);
            pwrite_all(f.fd, prefix.data(), prefix.size(), 0, path);
            count_write();
            fsync_or_throw(f.fd, path);
        },
        py::arg("path"), py::arg("header"), py::arg("expected_header_len"),
        "Overwrite a file's header in place (same length, so the data section stays where it is) and fsync it.");

    m.def(
        "safetensors_remove_ranges",
        [](const std::string& path, const std::vector<std::pair<uint64_t, uint64_t>>& holes, uint64_t original_size) {
            py::gil_scoped_release release;
            remove_ranges(path, holes, original_size);
        },
        py::arg("path"), py::arg("ranges"), py::arg("original_size"),
        "Remove sorted, disjoint [start, end) byte ranges from a file in place (collapse-range; a range ending at EOF "
        "is truncated). Resumable: rerunning after a kill finishes the job.");

    m.def(
        "collapse_range_support",
        [](const std::string& directory) {
            py::gil_scoped_release release;
            return collapse_support(directory);
        },
        py::arg("directory"), "(supported, block size) of FALLOC_FL_COLLAPSE_RANGE on the filesystem of `directory`.");
}
