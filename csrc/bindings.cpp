// Python bindings: citer._C.BlockManager. Batch fills write straight into numpy arrays.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "block_manager.h"

namespace py = pybind11;
using citer::BlockManager;

namespace {

template <typename T>
T* checked(py::array& a, int ndim, const char* name) {
  if (a.dtype().num() != py::dtype::of<T>().num() || !(a.flags() & py::array::c_style)) {
    throw py::value_error(std::string(name) + " must be a C-contiguous numpy array of " +
                          (sizeof(T) == 4 ? "int32" : "int64"));
  }
  if (a.ndim() != ndim) throw py::value_error(std::string(name) + " must have " + std::to_string(ndim) + " dims");
  return static_cast<T*>(a.mutable_data());
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "citer C++ core: the shared paged-KV page manager";
  py::register_exception<citer::CacheFull>(m, "CacheFull", PyExc_RuntimeError);

  py::class_<BlockManager>(m, "BlockManager")
      .def(py::init<int64_t, int64_t>(), py::arg("num_blocks"), py::arg("block_size"))
      .def("create_sequence", &BlockManager::create_sequence)
      .def("fork", &BlockManager::fork, py::arg("handle"))
      .def("free_sequence", &BlockManager::free_sequence, py::arg("handle"))
      .def("blocks_needed", &BlockManager::blocks_needed, py::arg("handle"), py::arg("num_new_tokens"))
      .def("can_append", &BlockManager::can_append, py::arg("handle"), py::arg("num_new_tokens"))
      .def("append_slots", &BlockManager::append_slots, py::arg("handle"), py::arg("num_new_tokens"))
      .def("truncate", &BlockManager::truncate, py::arg("handle"), py::arg("num_tokens"))
      .def("block_table", &BlockManager::block_table, py::arg("handle"))
      .def("num_tokens", &BlockManager::num_tokens, py::arg("handle"))
      .def("ref_count", &BlockManager::ref_count, py::arg("block"))
      .def("take_copy_ops", &BlockManager::take_copy_ops)
      .def("check_invariants", [](const BlockManager& bm) {
        try {
          bm.check_invariants();
        } catch (const std::logic_error& e) {
          throw std::runtime_error(std::string("block manager invariant broken: ") + e.what());
        }
      })
      .def_property_readonly("num_free_blocks", &BlockManager::num_free_blocks)
      .def_property_readonly("num_blocks", &BlockManager::num_blocks)
      .def_property_readonly("block_size", &BlockManager::block_size)
      .def_property_readonly("num_sequences", &BlockManager::num_sequences)
      .def("stats",
           [](const BlockManager& bm) {
             py::dict d;
             d["allocations"] = bm.stats().allocations;
             d["frees"] = bm.stats().frees;
             d["peak_used_blocks"] = bm.stats().peak_used_blocks;
             d["num_sequences"] = bm.num_sequences();
             d["num_free_blocks"] = bm.num_free_blocks();
             return d;
           })
      .def(
          "fill_block_tables",
          [](const BlockManager& bm, const std::vector<int64_t>& handles, py::array out, int32_t pad) {
            int32_t* data = checked<int32_t>(out, 2, "out");
            if (out.shape(0) != static_cast<py::ssize_t>(handles.size())) {
              throw py::value_error("out has " + std::to_string(out.shape(0)) + " rows for " +
                                    std::to_string(handles.size()) + " sequences");
            }
            bm.fill_block_tables(handles, data, out.shape(1), pad);
          },
          py::arg("handles"), py::arg("out"), py::arg("pad") = 0)
      .def(
          "fill_slot_mapping",
          [](const BlockManager& bm, const std::vector<int64_t>& handles, py::array starts, py::array ends,
             py::array out) {
            int64_t* s = checked<int64_t>(starts, 1, "starts");
            int64_t* e = checked<int64_t>(ends, 1, "ends");
            int64_t* o = checked<int64_t>(out, 1, "out");
            if (starts.shape(0) != static_cast<py::ssize_t>(handles.size()) || ends.shape(0) != starts.shape(0)) {
              throw py::value_error("starts and ends need one entry per sequence");
            }
            bm.fill_slot_mapping(handles, s, e, o, out.shape(0));
          },
          py::arg("handles"), py::arg("starts"), py::arg("ends"), py::arg("out"));
}
