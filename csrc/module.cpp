// The one pybind11 module. Each op registers itself from its own file, so this file only wires them.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common.h"

namespace py = pybind11;

void register_bi_reduce(py::module_& m);
void register_dequant(py::module_& m);
#ifdef SGF_WITH_SURGERY
void register_file_io(py::module_& m);
void register_safetensors_surgery(py::module_& m);
void register_gguf(py::module_& m);
#endif

PYBIND11_MODULE(_C, m) {
    m.doc() = "shortgpt_fast C++ core: fused Block Influence reduction, FP8 dequantization and checkpoint surgery (safetensors, GGUF)";
    register_bi_reduce(m);
    register_dequant(m);
#ifdef SGF_WITH_SURGERY
    // Linux-only (setup.py compiles it there); elsewhere shortgpt_fast/_native.py explains that surgery needs Linux.
    register_file_io(m);  // first: the engines' error types derive from its FileFormatError
    register_safetensors_surgery(m);
    register_gguf(m);
#endif
}
