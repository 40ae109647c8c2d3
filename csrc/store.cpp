// Store core: validation of matrix files, durable appends, atomic replacement, chunked read-ahead.
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

ChunkReader::ChunkReader(Store& store, const std::vector<std::string>& names, uint64_t start, uint64_t stop,
                         uint64_t rows_per_chunk)
    : start_(start), stop_(stop) {
    if (rows_per_chunk == 0) throw std::invalid_argument("rows per chunk must be positive");
    if (start > stop || stop > store.rows())
        throw std::out_of_range("row range [" + std::to_string(start) + ", " + std::to_string(stop) +
                                ") is outside the store's " + std::to_string(store.rows()) + " rows");
    rows_per_chunk_ = std::max<uint64_t>(1, std::min(rows_per_chunk, stop - start));
    chunk_count_ = (stop - start + rows_per_chunk_ - 1) / rows_per_chunk_;
    auto mappings = std::make_shared<std::vector<std::shared_ptr<const MappedFile>>>();
    for (const auto& name : names) {
        const Matrix& matrix = store.matrix(name);
        auto file = matrix.file();
        auto mapping =
            std::make_shared<const MappedFile>(*file, matrix.data_offset() + stop * matrix.row_bytes());
        if (mapping->size() > 0) {
            ::madvise(const_cast<uint8_t*>(mapping->data()), mapping->size(), MADV_SEQUENTIAL);
            ::posix_fadvise(file->fd(), 0, 0, POSIX_FADV_SEQUENTIAL);  // read(2)'s read-ahead window doubled
        }
        sources_.push_back({file, mapping, matrix.data_offset(), matrix.row_bytes()});
        mappings->push_back(std::move(mapping));
    }
    mappings_ = std::move(mappings);
    uint64_t chunk_bytes = 0;
    for (const Source& source : sources_) chunk_bytes += rows_per_chunk_ * source.row_bytes;
    read_ahead_ = std::max<uint64_t>(2, kReadAheadBytes / std::max<uint64_t>(chunk_bytes, 1));
    thread_ = std::thread([this] { run(); });
    for (size_t i = 0; i < sources_.size(); ++i) streams_.emplace_back([this, i] { stream(i); });
}

ChunkReader::~ChunkReader() { close(); }

void ChunkReader::close() {
    {
        std::lock_guard<std::mutex> lock(state_.mutex);
        state_.stop = true;
    }
    state_.changed.notify_all();
    if (thread_.joinable()) thread_.join();
    for (auto& stream : streams_)
        if (stream.joinable()) stream.join();
}

std::pair<uint64_t, uint64_t> ChunkReader::byte_range(const Source& source, uint64_t chunk_index) const {
    const uint64_t first = start_ + chunk_index * rows_per_chunk_;
    const uint64_t last = std::min(first + rows_per_chunk_, stop_);
    return {source.data_offset + first * source.row_bytes, source.data_offset + last * source.row_bytes};
}

namespace {

// Whether every page of [address, address + length) is in the page cache (mincore; address page-aligned).
bool resident(const uint8_t* address, uint64_t length) {
    static const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
    std::vector<unsigned char> pages((length + page - 1) / page);
    if (::mincore(const_cast<uint8_t*>(address), length, pages.data()) != 0) return false;
    return std::all_of(pages.begin(), pages.end(), [](unsigned char p) { return (p & 1) != 0; });
}

}  // namespace

// Cold pages come in faster by read(2), the kernel's sequential read path with its read-ahead, than by faulting
// them into a mapping; the bytes land in the page cache, where MADV_POPULATE_READ then maps them.
void ChunkReader::read_into_cache(const Source& source, uint64_t begin, uint64_t end) const {
    static thread_local std::vector<uint8_t> scratch(1u << 20);
    while (begin < end) {
        const size_t want = static_cast<size_t>(std::min<uint64_t>(scratch.size(), end - begin));
        const ssize_t got = ::pread(source.file->fd(), scratch.data(), want, static_cast<off_t>(begin));
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) throw_errno("cannot read", source.file->path());
        if (got == 0) return;  // the mapping's own faults report a short file
        begin += static_cast<uint64_t>(got);
    }
}

void ChunkReader::stream(size_t source_index) {
    static const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
    const Source& source = sources_[source_index];
    try {
        for (uint64_t chunk = 0; chunk < chunk_count_; ++chunk) {
            {
                std::unique_lock<std::mutex> lock(state_.mutex);
                state_.changed.wait(lock, [&] { return state_.stop || chunk < state_.taken + read_ahead_; });
                if (state_.stop) return;
            }
            const auto [begin, end] = byte_range(source, chunk);
            const uint64_t aligned = begin / page * page;
            if (begin < end && !resident(source.mapping->data() + aligned, end - aligned))
                read_into_cache(source, begin, end);
        }
    } catch (...) {
        {
            std::lock_guard<std::mutex> lock(state_.mutex);
            if (!state_.error) state_.error = std::current_exception();
        }
        state_.changed.notify_all();
    }
}

void ChunkReader::prefetch(uint64_t chunk_index) const {
    static const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
    for (const Source& source : sources_) {
        const auto [begin, end] = byte_range(source, chunk_index);
        if (begin == end) continue;
        const uint64_t aligned = begin / page * page;
        uint8_t* base = const_cast<uint8_t*>(source.mapping->data());
        if (::madvise(base + aligned, end - aligned, MADV_POPULATE_READ) == 0) continue;
        if (errno != EINVAL) throw_errno("cannot read", source.file->path());
        // Kernels before 5.14 lack MADV_POPULATE_READ: fault the pages in by touching one byte of each.
        volatile uint8_t sink = 0;
        for (uint64_t offset = aligned; offset < end; offset += page) sink = sink ^ base[offset];
    }
}

void ChunkReader::release(uint64_t chunk_index) const {
    static const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
    for (const Source& source : sources_) {
        const auto [begin, end] = byte_range(source, chunk_index);
        const uint64_t first_page = begin / page * page;
        const uint64_t last_page = end / page * page;  // the page shared with the next chunk stays
        if (last_page > first_page)
            ::madvise(const_cast<uint8_t*>(source.mapping->data()) + first_page, last_page - first_page,
                      MADV_DONTNEED);
    }
}

void ChunkReader::run() {
    try {
        for (uint64_t chunk = 0; chunk < chunk_count_; ++chunk) {
            {
                std::unique_lock<std::mutex> lock(state_.mutex);
                // Stay one chunk ahead of the consumer: fault in chunk `taken` while it works on `taken - 1`.
                state_.changed.wait(lock, [&] { return state_.stop || chunk <= state_.taken; });
                if (state_.stop) return;
            }
            prefetch(chunk);
            {
                std::lock_guard<std::mutex> lock(state_.mutex);
                state_.prefetched = chunk + 1;
            }
            state_.changed.notify_all();
        }
    } catch (...) {
        {
            std::lock_guard<std::mutex> lock(state_.mutex);
            if (!state_.error) state_.error = std::current_exception();
        }
        state_.changed.notify_all();
    }
}

bool ChunkReader::next(Chunk& chunk) {
    uint64_t index;
    {
        std::unique_lock<std::mutex> lock(state_.mutex);
        index = state_.taken;
        if (index >= chunk_count_) return false;
        state_.changed.wait(lock, [&] { return state_.prefetched > index || state_.error || state_.stop; });
        if (state_.prefetched <= index) {
            if (state_.error) std::rethrow_exception(state_.error);
            throw std::runtime_error("chunk reader is closed");
        }
        state_.taken = index + 1;
    }
    state_.changed.notify_all();
    if (index > 0) release(index - 1);  // the consumer has moved past the previous chunk
    chunk.start = start_ + index * rows_per_chunk_;
    chunk.stop = std::min(chunk.start + rows_per_chunk_, stop_);
    chunk.data.clear();
    for (const Source& source : sources_) chunk.data.push_back(source.mapping->data() + byte_range(source, index).first);
    chunk.keep_alive = mappings_;
    return true;
}

}  // namespace cfbd
