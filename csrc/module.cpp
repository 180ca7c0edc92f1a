// gradprobe._C: the Python module is empty; importing it runs the static op registrations
// (TORCH_LIBRARY_FRAGMENT(gradprobe_cpp, ...) in the other csrc/*.cpp files).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "gradprobe compiled ops (registered with torch.library)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
