// File I/O shared by the checkpoint engines; see file_io.h.
#include "surgery/file_io.h"

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

namespace sgf {
namespace {

// The fallback copy loop's only buffer; memory use stays flat whatever the checkpoint size.
constexpr size_t kCopyBufferBytes = 8u << 20;
// copy_file_range is asked for at most this much per call, so a kill-after-k-writes test hook has points to hit
// inside large tensors and the kernel never pins one huge request.
constexpr size_t kCopyChunkBytes = 64u << 20;

[[noreturn]] void throw_file_format(const std::string& path, const std::string& why) {
    throw FormatError(printable(path + ": " + why));
}

long long kill_after_writes() {
    static long long limit = [] {
        const char* v = std::getenv("SHORTGPT_FAST_SURGERY_KILL_AFTER_WRITES");
        return v ? std::atoll(v) : -1LL;
    }();
    return limit;
}

}  // namespace

void throw_os(const std::string& what, const std::string& path) {
    throw OsError(printable(what + " " + path + ": " + std::strerror(errno)));
}

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

void count_write() {
    static long long done = 0;
    long long limit = kill_after_writes();
    if (limit >= 0 && ++done > limit) ::kill(::getpid(), SIGKILL);
}

Fd::~Fd() {
    if (fd >= 0) ::close(fd);
}

int open_regular(const std::string& path, int flags) {
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait forever for a writer; the type check right after
    // refuses it (and devices) before anything is read.
    int fd = ::open(path.c_str(), flags | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
    if (fd < 0) {
        if (errno == ELOOP) throw_file_format(path, "is a symlink; refusing to follow it");
        throw_os("cannot open", path);
    }
    struct stat st;
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ::close(fd);
        throw_file_format(path, "is not a regular file (a FIFO, device, socket or folder); refusing to open it");
    }
    // Regular files ignore O_NONBLOCK, but clear it so nothing depends on that.
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    return fd;
}

uint64_t file_size(int fd, const std::string& path) {
    struct stat st;
    if (::fstat(fd, &st) != 0) throw_os("cannot stat", path);
    return static_cast<uint64_t>(st.st_size);
}

void pread_all(int fd, char* buf, size_t n, uint64_t off, const std::string& path) {
    while (n > 0) {
        ssize_t got = ::pread(fd, buf, n, static_cast<off_t>(off));
        if (got < 0) {
            if (errno == EINTR) continue;
            throw_os("cannot read", path);
        }
        if (got == 0) throw_file_format(path, "file ended while reading (truncated?)");
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

void fsync_or_throw(int fd, const std::string& path) {
    if (::fsync(fd) != 0) throw_os("cannot fsync", path);
}

bool reflink(int dst_fd, int src_fd) { return ::ioctl(dst_fd, FICLONE, src_fd) == 0; }

Copier::Copier(std::string method) : method_(std::move(method)) {
    if (method_ != "auto" && method_ != "copy_file_range" && method_ != "readwrite")
        throw std::invalid_argument("copy method must be auto, copy_file_range or readwrite, got " + method_);
    kernel_copy_ok_ = method_ != "readwrite";
}

void Copier::copy(int src, int dst, uint64_t src_off, uint64_t dst_off, uint64_t len, const std::string& src_path,
                  const std::string& dst_path) {
    while (len > 0 && kernel_copy_ok_) {
        loff_t so = static_cast<loff_t>(src_off), d = static_cast<loff_t>(dst_off);
        size_t want = static_cast<size_t>(std::min<uint64_t>(len, kCopyChunkBytes));
        ssize_t got = ::copy_file_range(src, &so, dst, &d, want, 0);
        if (got < 0) {
            if (errno == EINTR) continue;
            if (method_ == "auto" && (errno == EXDEV || errno == ENOSYS || errno == EOPNOTSUPP || errno == EINVAL ||
                                      errno == EIO || errno == ETXTBSY)) {
                kernel_copy_ok_ = false;
                break;
            }
            throw_os("copy_file_range failed from " + src_path + " to", dst_path);
        }
        if (got == 0) throw_file_format(src_path, "file ended while copying tensor data (truncated?)");
        count_write();
        used = "copy_file_range";
        src_off += static_cast<uint64_t>(got);
        dst_off += static_cast<uint64_t>(got);
        len -= static_cast<uint64_t>(got);
        bytes += static_cast<uint64_t>(got);
    }
    if (len == 0) return;
    if (buffer_.empty()) buffer_.resize(kCopyBufferBytes);
    used = "readwrite";
    while (len > 0) {
        size_t want = static_cast<size_t>(std::min<uint64_t>(len, buffer_.size()));
        pread_all(src, buffer_.data(), want, src_off, src_path);
        pwrite_all(dst, buffer_.data(), want, dst_off, dst_path);
        count_write();
        src_off += want;
        dst_off += want;
        len -= want;
        bytes += want;
    }
}

CopyResult write_file(const std::string& src_path, const std::string& dst_path, const std::string& prefix,
                      const std::vector<std::pair<uint64_t, uint64_t>>& runs, bool allow_clone,
                      const std::string& method, bool do_fsync, unsigned mode) {
    Copier copier(method);
    Fd src(open_regular(src_path, O_RDONLY));
    // O_EXCL | O_NOFOLLOW: the caller removes its own stale temp file first, so anything already at this name (a
    // planted symlink to a file outside the checkpoint) is refused, never written through.
    Fd dst(::open(dst_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
    if (dst.fd < 0) throw_os("cannot create", dst_path);
    // The result keeps the source's permissions (a 0600 shard must not come out world-readable); fchmod, not the
    // open() mode, because open() applies the umask.
    if (::fchmod(dst.fd, static_cast<mode_t>(mode & 07777)) != 0) throw_os("cannot chmod", dst_path);
    uint64_t total = prefix.size();
    for (auto& r : runs) total += r.second;
    bool cloned = false;
    // A whole-file reflink shares every data extent for free; only the prefix is then rewritten.
    if (allow_clone && method == "auto" && reflink(dst.fd, src.fd)) {
        if (file_size(dst.fd, dst_path) == total) {
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
        // Neighbouring runs are merged so a file that lost one tensor still moves in a few large calls.
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
        // Start writeback now without waiting for it, so the caller's later fsync overlaps with copying the next
        // file instead of serialising after it. Only a hint: failure changes nothing.
        ::sync_file_range(dst.fd, 0, 0, SYNC_FILE_RANGE_WRITE);
    }
    return {copier.bytes, copier.used.empty() ? std::string("none") : copier.used};
}

void overwrite_prefix(const std::string& path, const std::string& prefix, uint64_t min_size) {
    Fd f(open_regular(path, O_WRONLY));
    if (file_size(f.fd, path) < min_size)
        throw_file_format(path, "file is shorter than its header; refusing to write into it");
    pwrite_all(f.fd, prefix.data(), prefix.size(), 0, path);
    count_write();
    fsync_or_throw(f.fd, path);
}

// Collapse-range drops whole blocks from the extent map, so the cost does not grow with the data after the hole. It
// needs a block-aligned offset and length; a hole whose length is a multiple of the block size but whose start is not
// is handled by first copying the (< 1 block) tail of the kept data before it into the end of the hole, then
// collapsing from the block boundary. Holes are removed last to first, so earlier offsets stay valid, and each
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
    uint64_t current = file_size(f.fd, path);
    if (current != size && std::find(size_before.begin(), size_before.end(), current) == size_before.end())
        throw_file_format(path, "is " + std::to_string(current) +
                                    " bytes, which matches no step of this cut; it was changed outside the cut");
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

}  // namespace sgf
