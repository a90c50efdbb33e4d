// Python bindings of the format-independent file operations (file_io.h) and of their error types.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "surgery/file_io.h"

namespace py = pybind11;

void register_file_io(py::module_& m) {
    using namespace sgf;
    py::register_exception<FormatError>(m, "FileFormatError", PyExc_ValueError);
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const OsError& e) {
            PyErr_SetString(PyExc_OSError, e.what());
        }
    });

    m.def(
        "write_file",
        [](const std::string& src_path, const std::string& dst_path, const py::bytes& prefix,
           const std::vector<std::pair<uint64_t, uint64_t>>& runs, bool allow_clone, const std::string& method,
           bool do_fsync, unsigned mode) {
            std::string head = prefix;
            py::gil_scoped_release release;
            CopyResult r = sgf::write_file(src_path, dst_path, head, runs, allow_clone, method, do_fsync, mode);
            return std::make_tuple(r.bytes, r.method);
        },
        py::arg("src_path"), py::arg("dst_path"), py::arg("prefix"), py::arg("runs"), py::arg("allow_clone") = false,
        py::arg("method") = "auto", py::arg("fsync") = true, py::arg("mode") = 0644,
        "Create dst (must not exist) with permission bits `mode` as `prefix` followed by the source byte ranges "
        "`runs` [(offset, length)]. Returns (bytes copied, method: reflink, copy_file_range, readwrite or none).");

    m.def(
        "overwrite_prefix",
        [](const std::string& path, const py::bytes& prefix, uint64_t min_size) {
            std::string head = prefix;
            py::gil_scoped_release release;
            sgf::overwrite_prefix(path, head, min_size);
        },
        py::arg("path"), py::arg("prefix"), py::arg("min_size"),
        "Overwrite the first bytes of an existing file (at least min_size bytes long) and fsync it.");

    auto remove = [](const std::string& path, const std::vector<std::pair<uint64_t, uint64_t>>& holes,
                     uint64_t original_size) {
        py::gil_scoped_release release;
        remove_ranges(path, holes, original_size);
    };
    const char* remove_doc =
        "Remove sorted, disjoint [start, end) byte ranges from a file in place (collapse-range; a range ending at EOF "
        "is truncated). Resumable: rerunning after a kill finishes the job.";
    m.def("remove_ranges", remove, py::arg("path"), py::arg("ranges"), py::arg("original_size"), remove_doc);
    // The safetensors engine's historical name for the same operation.
    m.def("safetensors_remove_ranges", remove, py::arg("path"), py::arg("ranges"), py::arg("original_size"),
          remove_doc);

    m.def(
        "collapse_range_support",
        [](const std::string& directory) {
            py::gil_scoped_release release;
            return collapse_support(directory);
        },
        py::arg("directory"), "(supported, block size) of FALLOC_FL_COLLAPSE_RANGE on the filesystem of `directory`.");
}
