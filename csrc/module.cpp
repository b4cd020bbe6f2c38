// Python module entry point of ghostkernels._C.
//
// The kernels themselves are registered with the PyTorch dispatcher (TORCH_LIBRARY_FRAGMENT /
// TORCH_LIBRARY_IMPL in each op's files, namespace "ghostkernels_C"); importing this module loads
// the shared library and thereby runs those registrations. The module itself only reports how the
// library was built.
#include <Python.h>

static struct PyModuleDef ghostkernels_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "ghostkernels compiled kernels (registered as torch.ops.ghostkernels_C)",
    -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&ghostkernels_c_module);
  if (m == nullptr) return nullptr;
#ifdef GHOSTKERNELS_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  return m;
}
