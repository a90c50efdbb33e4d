// safetensors checkpoint surgery. Placeholder registration until the engine lands.
#include <pybind11/pybind11.h>
namespace py = pybind11;
void register_safetensors_surgery(py::module_& m) { (void)m; }
