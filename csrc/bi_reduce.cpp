// Fused Block Influence reduction (CPU). Placeholder registration until the kernel lands.
#include <pybind11/pybind11.h>
namespace py = pybind11;
void register_bi_reduce(py::module_& m) { (void)m; }
