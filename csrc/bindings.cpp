// Python bindings of the store core: translation only (arrays in and out, exceptions, releasing the GIL).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "store.hpp"

namespace py = pybind11;

namespace {

cfbd::DType dtype_from_code(uint32_t code) {
    if (!cfbd::dtype_is_known(code)) throw std::invalid_argument("unknown dtype code " + std::to_string(code));
    return static_cast<cfbd::DType>(code);
}

// bfloat16 rows come out as uint16; the Python layer views them as ml_dtypes.bfloat16.
py::dtype numpy_dtype(cfbd::DType dtype) {
    switch (dtype) {
        case cfbd::DType::float16: return py::dtype("float16");
        case cfbd::DType::bfloat16: return py::dtype("uint16");
        case cfbd::DType::float32: return py::dtype("float32");
    }
    throw std::invalid_argument("unknown dtype");
}

// A read-only (rows, dim) array over `data` that does not copy; `base` keeps the memory alive.
py::array readonly_view(cfbd::DType dtype, uint64_t rows, uint32_t dim, const uint8_t* data, const py::object& base) {
    const auto itemsize = static_cast<py::ssize_t>(cfbd::dtype_size(dtype));
    py::array array(numpy_dtype(dtype), {static_cast<py::ssize_t>(rows), static_cast<py::ssize_t>(dim)},
                    {itemsize * static_cast<py::ssize_t>(dim), itemsize}, const_cast<uint8_t*>(data), base);
    array.attr("setflags")(py::arg("write") = false);
    return array;
}

template <typename T>
py::capsule owning_capsule(T value) {
    return py::capsule(new T(std::move(value)), [](void* pointer) { delete static_cast<T*>(pointer); });
}

struct PyChunkReader {
    std::unique_ptr<cfbd::ChunkReader> reader;
    cfbd::DType dtype;
    uint32_t dim;
};

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "C++ core of the cfbd embedding store (memory-mapped matrix files, durable appends, chunk streaming).";

    // Held for the life of the process (the translator outlives any scope that could own it).
    static PyObject* store_format_error =
        py::object(py::module_::import("cfbd_fast.errors").attr("StoreFormatError")).release().ptr();
    py::register_exception_translator([](std::exception_ptr error) {
        try {
            if (error) std::rethrow_exception(error);
        } catch (const cfbd::FormatError& e) {
            PyErr_SetString(store_format_error, e.what());
        } catch (const cfbd::IoError& e) {
            const std::string reason = e.action + ": " + std::strerror(e.code);
            py::tuple args = py::make_tuple(e.code, reason, e.path);
            PyErr_SetObject(PyExc_OSError, args.ptr());
        }
    });

    m.attr("FORMAT_VERSION") = cfbd::kFormatVersion;

    py::class_<cfbd::Store>(m, "Store")
        .def_static(
            "create",
            [](const std::string& dir, const std::vector<std::string>& names, uint32_t dtype, uint32_t dim) {
                py::gil_scoped_release release;
                return cfbd::Store::create(dir, names, dtype_from_code(dtype), dim);
            },
            py::arg("dir"), py::arg("names"), py::arg("dtype"), py::arg("dim"))
        .def_static(
            "open",
            [](const std::string& dir, const std::vector<std::string>& names, uint64_t rows, uint32_t dtype,
               uint32_t dim, bool writable) {
                py::gil_scoped_release release;
                return cfbd::Store::open(dir, names, rows, dtype_from_code(dtype), dim, writable);
            },
            py::arg("dir"), py::arg("names"), py::arg("rows"), py::arg("dtype"), py::arg("dim"), py::arg("writable"))
        .def_property_readonly("rows", &cfbd::Store::rows)
        .def(
            "append",
            [](cfbd::Store& store, const std::vector<py::array>& arrays) {
                auto& matrices = store.matrices();
                if (arrays.size() != matrices.size())
                    throw std::invalid_argument("append needs " + std::to_string(matrices.size()) + " arrays");
                std::vector<const void*> data;
                const py::ssize_t rows = arrays.empty() ? 0 : arrays.front().shape(0);
                for (size_t i = 0; i < arrays.size(); ++i) {
                    const py::array& array = arrays[i];
                    const cfbd::Matrix& matrix = matrices[i];
                    if (array.ndim() != 2 || array.shape(0) != rows || array.shape(1) != matrix.dim() ||
                        array.itemsize() != static_cast<py::ssize_t>(cfbd::dtype_size(matrix.dtype())) ||
                        !(array.flags() & py::array::c_style))
                        throw std::invalid_argument("append: array for '" + matrix.name() +
                                                    "' must be C-contiguous with shape (rows, dim) and the store's dtype");
                    data.push_back(array.data());
                }
                py::gil_scoped_release release;
                store.append(data, static_cast<uint64_t>(rows));
            },
            py::arg("arrays"))
        .def(
            "truncate",
            [](cfbd::Store& store, uint64_t rows) {
                py::gil_scoped_release release;
                store.truncate(rows);
            },
            py::arg("rows"))
        .def(
            "view",
            [](cfbd::Store& store, const std::string& name, uint64_t rows) {
                cfbd::Matrix& matrix = store.matrix(name);
                if (rows > matrix.rows()) throw std::out_of_range("view beyond the rows written");
                auto mapping = matrix.mapping(rows);
                const uint8_t* data = mapping->data() + matrix.data_offset();
                return readonly_view(matrix.dtype(), rows, matrix.dim(), data, owning_capsule(std::move(mapping)));
            },
            py::arg("name"), py::arg("rows"));

    py::class_<PyChunkReader>(m, "ChunkReader")
        .def(py::init([](cfbd::Store& store, const std::vector<std::string>& names, uint64_t start, uint64_t stop,
                         uint64_t rows) {
                 if (names.empty()) throw std::invalid_argument("iter_chunks needs at least one matrix");
                 const cfbd::Matrix& first = store.matrix(names.front());
                 auto reader = std::make_unique<cfbd::ChunkReader>(store, names, start, stop, rows);
                 return PyChunkReader{std::move(reader), first.dtype(), first.dim()};
             }),
             py::arg("store"), py::arg("names"), py::arg("start"), py::arg("stop"), py::arg("rows"))
        .def("next",
             [](PyChunkReader& self) -> py::object {
                 cfbd::ChunkReader::Chunk chunk;
                 bool more;
                 {
                     py::gil_scoped_release release;
                     more = self.reader->next(chunk);
                 }
                 if (!more) return py::none();
                 py::capsule owner = owning_capsule(std::move(chunk.keep_alive));
                 py::list arrays;
                 for (const uint8_t* data : chunk.data)
                     arrays.append(readonly_view(self.dtype, chunk.stop - chunk.start, self.dim, data, owner));
                 return py::make_tuple(chunk.start, chunk.stop, arrays);
             })
        .def("close", [](PyChunkReader& self) {
            py::gil_scoped_release release;
            self.reader->close();
        });

    m.def(
        "replace_file_atomic",
        [](const std::string& path, const py::bytes& content) {
            std::string bytes = content;
            py::gil_scoped_release release;
            cfbd::replace_file_atomic(path, bytes);
        },
        py::arg("path"), py::arg("content"), "Write PATH.tmp, fsync, rename over PATH, fsync the directory.");
    m.def(
        "write_file_durable",
        [](const std::string& path, const py::bytes& content) {
            std::string bytes = content;
            py::gil_scoped_release release;
            cfbd::write_file_durable(path, bytes);
        },
        py::arg("path"), py::arg("content"), "Write PATH, fsync it and its directory.");
}
