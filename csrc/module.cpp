// The one pybind11 module. Each op registers itself from its own file, so this file only wires them.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common.h"

namespace py = pybind11;

void register_bi_reduce(py::module_& m);
void register_safetensors_surgery(py::module_& m);

PYBIND11_MODULE(_C, m) {
    m.doc() = "shortgpt_fast C++ core: fused Block Influence reduction and safetensors checkpoint surgery";
    m.def("cpu_features", &sgf::cpu_features,
          "Instruction-set extensions this CPU offers, as detected at run time.");
    register_bi_reduce(m);
    register_safetensors_surgery(m);
}
