#pragma once
// File I/O shared by the checkpoint engines (safetensors, GGUF): bounded reads and writes, whole-file clones, in-kernel
// copies with a flat-memory fallback, durable header rewrites and in-place removal of byte ranges. Linux-only (built
// with SGF_WITH_SURGERY). Every failure is one line naming the file; nothing here knows a file format.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace sgf {

// An operating-system call failed (surfaces in Python as OSError).
struct OsError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// The file's content is wrong (surfaces in Python as a ValueError subclass). Format engines derive their own.
struct FormatError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

[[noreturn]] void throw_os(const std::string& what, const std::string& path);

// Names come from untrusted files; control characters in them would break the one-line error contract.
std::string printable(const std::string& text);

// Test hook for crash-safety tests: counts a write and SIGKILLs this process after the k-th one when
// SHORTGPT_FAST_SURGERY_KILL_AFTER_WRITES=k is set (read once; unset in normal use).
void count_write();

struct Fd {
    int fd = -1;
    Fd() = default;
    explicit Fd(int f) : fd(f) {}
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
    ~Fd();
};

// Opens a file an engine reads or edits. Refuses symlinks (Python resolves and vets links itself, so a link here was
// swapped in behind its back) and anything but a regular file (a FIFO would block the read forever).
int open_regular(const std::string& path, int flags);
uint64_t file_size(int fd, const std::string& path);

// Exactly n bytes or a one-line error ("file ended while reading" is a FormatError: the file is truncated).
void pread_all(int fd, char* buf, size_t n, uint64_t off, const std::string& path);
void pwrite_all(int fd, const char* buf, size_t n, uint64_t off, const std::string& path);
void fsync_or_throw(int fd, const std::string& path);

// Whole-file reflink of src into dst (FICLONE); false where the filesystem cannot share extents.
bool reflink(int dst_fd, int src_fd);

// Copies byte ranges between files: copy_file_range (in-kernel, reflinks on CoW filesystems), falling back for good to
// a pread/pwrite loop with one fixed buffer when the kernel or filesystem pair refuses it.
class Copier {
  public:
    // method: "auto", "copy_file_range" or "readwrite"; anything else is std::invalid_argument.
    explicit Copier(std::string method);
    void copy(int src, int dst, uint64_t src_off, uint64_t dst_off, uint64_t len, const std::string& src_path,
              const std::string& dst_path);
    uint64_t bytes = 0;
    std::string used;  // the last method that moved bytes ("" when none did)

  private:
    std::string method_;
    bool kernel_copy_ok_;
    std::vector<char> buffer_;
};

struct CopyResult {
    uint64_t bytes = 0;
    std::string method;  // reflink, copy_file_range, readwrite or none
};

// Creates dst (which must not exist) with permission bits `mode` as `prefix` followed by the source byte ranges
// `runs` [(offset, length)] in order. With allow_clone and method "auto", a source whose size equals the result is
// reflinked whole and only the prefix is written. Without do_fsync, writeback is only started (the caller fsyncs).
CopyResult write_file(const std::string& src_path, const std::string& dst_path, const std::string& prefix,
                      const std::vector<std::pair<uint64_t, uint64_t>>& runs, bool allow_clone,
                      const std::string& method, bool do_fsync, unsigned mode);

// Overwrites the first bytes of an existing file with `prefix` and fsyncs; refuses a file shorter than min_size.
void overwrite_prefix(const std::string& path, const std::string& prefix, uint64_t min_size);

// Removes sorted, disjoint [start, end) byte ranges from a file in place (collapse-range; a range ending at EOF is
// truncated). Resumable: the file size alone tells how many removals a killed run completed.
void remove_ranges(const std::string& path, const std::vector<std::pair<uint64_t, uint64_t>>& holes,
                   uint64_t original_size);

// (supported, block size) of FALLOC_FL_COLLAPSE_RANGE on the filesystem of `directory`, probed on a scratch file.
std::pair<bool, uint64_t> collapse_support(const std::string& directory);

}  // namespace sgf
