#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef fastmodule = {PyModuleDef_HEAD_INIT, "_fast", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__fast(void) { return PyModule_Create(&fastmodule); }
