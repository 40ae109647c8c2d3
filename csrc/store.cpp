// Store core: validation of matrix files, durable appends, atomic replacement (the chunk reader: chunk_reader.cpp).
#include "store.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace cfbd {
namespace {

constexpr uint64_t kMaxIo = 1u << 30;  // bytes per pread/pwrite call

std::string base_name(const std::string& path) {
    const auto slash = path.find_last_of('/');
    return slash == std::string::npos ? path : path.substr(slash + 1);
}

std::string parent_dir(const std::string& path) {
    const auto slash = path.find_last_of('/');
    if (slash == std::string::npos) return ".";
    return slash == 0 ? "/" : path.substr(0, slash);
}

[[noreturn]] void format_error(const std::string& path, const std::string& what) {
    throw FormatError(path + ": " + what);
}

void pread_all(const FileHandle& file, uint8_t* out, uint64_t length, uint64_t offset) {
    while (length > 0) {
        const ssize_t n = ::pread(file.fd(), out, std::min(length, kMaxIo), static_cast<off_t>(offset));
        if (n < 0) {
            if (errno == EINTR) continue;
            throw_errno("cannot read", file.path());
        }
        if (n == 0) format_error(file.path(), "truncated: the file ended while reading it (was it shortened?)");
        out += n;
        length -= static_cast<uint64_t>(n);
        offset += static_cast<uint64_t>(n);
    }
}

void pwrite_all(const FileHandle& file, const uint8_t* data, uint64_t length, uint64_t offset) {
    while (length > 0) {
        const ssize_t n = ::pwrite(file.fd(), data, std::min(length, kMaxIo), static_cast<off_t>(offset));
        if (n < 0) {
            if (errno == EINTR) continue;
            throw_errno("cannot write", file.path());
        }
        data += n;
        length -= static_cast<uint64_t>(n);
        offset += static_cast<uint64_t>(n);
    }
}

void truncate_file(const FileHandle& file, uint64_t length) {
    if (::ftruncate(file.fd(), static_cast<off_t>(length)) != 0) throw_errno("cannot truncate", file.path());
}

uint64_t file_size(const FileHandle& file) {
    struct stat st{};
    if (::fstat(file.fd(), &st) != 0) throw_errno("cannot stat", file.path());
    return static_cast<uint64_t>(st.st_size);
}

void sync_directory(const std::string& dir) {
    FileHandle handle(dir, O_RDONLY | O_DIRECTORY);
    handle.sync();
}

void write_new_file(const std::string& path, const std::string& content) {
    FileHandle file(path, O_WRONLY | O_CREAT | O_TRUNC);
    pwrite_all(file, reinterpret_cast<const uint8_t*>(content.data()), content.size(), 0);
    file.sync();
}

std::string matrix_path(const std::string& dir, const std::string& name) { return dir + "/" + name + ".emb"; }

void check_name(const std::string& name) {
    if (name.empty() || name.size() > kMaxNameBytes || name.find_first_of("/\\.") != std::string::npos ||
        name.find('\0') != std::string::npos)
        throw std::invalid_argument("matrix name '" + name + "' must be 1-23 characters without '/', '\\' or '.'");
}

}  // namespace

Matrix Matrix::create(const std::string& dir, const std::string& name, DType dtype, uint32_t dim) {
    check_name(name);
    if (dim == 0 || dim > kMaxDim) throw std::invalid_argument("dim must be in 1.." + std::to_string(kMaxDim));
    Matrix matrix;
    matrix.name_ = name;
    matrix.path_ = matrix_path(dir, name);
    matrix.file_ = std::make_shared<FileHandle>(matrix.path_, O_RDWR | O_CREAT | O_EXCL);
    matrix.header_ = make_header(dtype, dim, name);
    pwrite_all(*matrix.file_, reinterpret_cast<const uint8_t*>(&matrix.header_), sizeof(Header), 0);
    truncate_file(*matrix.file_, matrix.header_.data_offset);
    matrix.file_->sync();
    return matrix;
}

Matrix Matrix::open(const std::string& dir, const std::string& name, bool writable) {
    check_name(name);
    Matrix matrix;
    matrix.name_ = name;
    matrix.path_ = matrix_path(dir, name);
    const std::string& path = matrix.path_;
    struct stat st{};
    if (::stat(path.c_str(), &st) != 0) {
        if (errno == ENOENT) format_error(path, "missing: the commit record lists matrix '" + name + "'");
        throw_errno("cannot stat", path);
    }
    if (!S_ISREG(st.st_mode)) format_error(path, "not a regular file");
    matrix.file_ = std::make_shared<FileHandle>(path, writable ? O_RDWR : O_RDONLY);
    const uint64_t size = file_size(*matrix.file_);

    Header& header = matrix.header_;
    const uint64_t head_bytes = std::min<uint64_t>(size, sizeof(Header));
    pread_all(*matrix.file_, reinterpret_cast<uint8_t*>(&header), head_bytes, 0);
    const size_t magic_bytes = std::min<size_t>(head_bytes, sizeof(kMagic));
    if (size == 0) format_error(path, "truncated: empty file, expected a 64-byte header");
    if (std::memcmp(header.magic, kMagic, magic_bytes) != 0) format_error(path, "not a cfbd store (bad magic)");
    if (size < sizeof(Header))
        format_error(path, "truncated header: " + std::to_string(size) + " bytes, a matrix file starts with 64");
    if (header.format_version > kFormatVersion)
        format_error(path, "written by a newer format version (v" + std::to_string(header.format_version) +
                               ", this build reads v" + std::to_string(kFormatVersion) + "): upgrade cfbd-fast");
    if (header_checksum(header) != header.checksum) format_error(path, "corrupt header (checksum mismatch)");
    if (header.format_version == 0 || header.header_size != sizeof(Header))
        format_error(path, "corrupt header (format version 0 or header size " +
                               std::to_string(header.header_size) + ")");
    if (!dtype_is_known(header.dtype)) format_error(path, "unknown dtype code " + std::to_string(header.dtype));
    if (header.dim == 0 || header.dim > kMaxDim) format_error(path, "invalid dim " + std::to_string(header.dim));
    if (header.data_offset < sizeof(Header) || header.data_offset % kDataAlignment != 0 ||
        header.data_offset > (uint64_t{1} << 30))
        format_error(path, "invalid data offset " + std::to_string(header.data_offset));
    const std::string stored_name(header.name, strnlen(header.name, sizeof(header.name)));
    if (stored_name != name) format_error(path, "holds matrix '" + stored_name + "', expected '" + name + "'");

    matrix.size_ = size;
    matrix.writable_ = writable;
    return matrix;
}

void Matrix::expect_rows(uint64_t committed_rows) {
    const uint64_t row_bytes = this->row_bytes();
    const uint64_t max_rows = (std::numeric_limits<uint64_t>::max() - data_offset()) / row_bytes;
    if (committed_rows > max_rows)
        format_error(path_, "commit record says " + std::to_string(committed_rows) + " rows, more than any file holds");
    const uint64_t held = size_ < data_offset() ? 0 : (size_ - data_offset()) / row_bytes;
    if (held < committed_rows)
        format_error(path_, "truncated: commit record says " + std::to_string(committed_rows) + " rows, " +
                                base_name(path_) + " holds " + std::to_string(held));
    const uint64_t committed_end = data_offset() + committed_rows * row_bytes;
    if (writable_ && size_ != committed_end) {
        truncate_file(*file_, committed_end);
        file_->sync();
        size_ = committed_end;
    }
    rows_ = committed_rows;
}

void Matrix::write_rows(const void* data, uint64_t rows) {
    pwrite_all(*file_, static_cast<const uint8_t*>(data), rows * row_bytes(), data_offset() + rows_ * row_bytes());
    rows_ += rows;
}

void Matrix::truncate(uint64_t rows) {
    truncate_file(*file_, data_offset() + rows * row_bytes());
    rows_ = rows;
}

std::shared_ptr<const MappedFile> Matrix::mapping(uint64_t rows) {
    const uint64_t needed = data_offset() + rows * row_bytes();
    if (!mapping_ || mapping_->size() < needed) mapping_ = std::make_shared<const MappedFile>(*file_, needed);
    return mapping_;
}

Store Store::create(const std::string& dir, const std::vector<std::string>& names, DType dtype, uint32_t dim) {
    if (names.empty()) throw std::invalid_argument("a store needs at least one matrix");
    Store store;
    for (const auto& name : names) store.matrices_.push_back(Matrix::create(dir, name, dtype, dim));
    sync_directory(dir);
    return store;
}

Store Store::open(const std::string& dir, const std::vector<std::string>& names, uint64_t rows, DType dtype,
                  uint32_t dim, bool writable) {
    if (names.empty()) format_error(dir + "/store.json", "corrupt commit record: it lists no matrices");
    Store store;
    for (const auto& name : names) {
        Matrix matrix = Matrix::open(dir, name, writable);
        if (!store.matrices_.empty()) {
            const Matrix& first = store.matrices_.front();
            const std::string first_name = base_name(first.path());
            if (matrix.dtype() != first.dtype())
                format_error(matrix.path(), std::string("dtype mismatch between matrices: ") +
                                                dtype_name(matrix.dtype()) + " here, " + dtype_name(first.dtype()) +
                                                " in " + first_name);
            if (matrix.dim() != first.dim())
                format_error(matrix.path(), "dim mismatch between matrices: " + std::to_string(matrix.dim()) +
                                                " here, " + std::to_string(first.dim()) + " in " + first_name);
        }
        if (matrix.dtype() != dtype)
            format_error(matrix.path(), std::string("dtype mismatch: ") + dtype_name(matrix.dtype()) +
                                            " here, the commit record says " + dtype_name(dtype));
        if (matrix.dim() != dim)
            format_error(matrix.path(), "dim mismatch: " + std::to_string(matrix.dim()) +
                                            " here, the commit record says " + std::to_string(dim));
        store.matrices_.push_back(std::move(matrix));
    }
    for (auto& matrix : store.matrices_) matrix.expect_rows(rows);
    return store;
}

void Store::append(const std::vector<const void*>& data, uint64_t rows) {
    if (data.size() != matrices_.size()) throw std::invalid_argument("append needs one array per matrix");
    const uint64_t before = this->rows();
    try {
        for (size_t i = 0; i < matrices_.size(); ++i) matrices_[i].write_rows(data[i], rows);
        for (const auto& matrix : matrices_) matrix.sync();
    } catch (...) {
        for (auto& matrix : matrices_) {
            try {
                matrix.truncate(before);
            } catch (...) {  // the first error is the one to report; reopening truncates again
            }
        }
        throw;
    }
}

void Store::truncate(uint64_t rows) {
    for (auto& matrix : matrices_) {
        matrix.truncate(rows);
        matrix.sync();
    }
}

Matrix& Store::matrix(const std::string& name) {
    for (auto& matrix : matrices_)
        if (matrix.name() == name) return matrix;
    throw std::out_of_range("no matrix named '" + name + "'");
}

void replace_file_atomic(const std::string& path, const std::string& content) {
    const std::string temp = path + ".tmp";
    write_new_file(temp, content);
    if (::rename(temp.c_str(), path.c_str()) != 0) throw_errno("cannot rename " + temp + " to", path);
    sync_directory(parent_dir(path));
}

void write_file_durable(const std::string& path, const std::string& content) {
    write_new_file(path, content);
    sync_directory(parent_dir(path));
}

}  // namespace cfbd
