// Python-free store core: matrix files (create, validate, append, map) and a read-ahead chunk reader.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "errors.hpp"
#include "format.hpp"
#include "mapped_file.hpp"

namespace cfbd {

// One embedding matrix: DIR/NAME.emb, a Header then row-major rows.
class Matrix {
public:
    // Writes a new file holding only the header (fails if the file exists) and fsyncs it.
    static Matrix create(const std::string& dir, const std::string& name, DType dtype, uint32_t dim);
    // Opens the file and validates its header.
    static Matrix open(const std::string& dir, const std::string& name, bool writable);
    // Checks that the file holds at least `committed_rows` rows; when writable, cuts off the uncommitted
    // tail an interrupted append may have left.
    void expect_rows(uint64_t committed_rows);

    const std::string& name() const { return name_; }
    const std::string& path() const { return path_; }
    DType dtype() const { return static_cast<DType>(header_.dtype); }
    uint32_t dim() const { return header_.dim; }
    uint64_t row_bytes() const { return static_cast<uint64_t>(header_.dim) * dtype_size(dtype()); }
    uint64_t data_offset() const { return header_.data_offset; }
    uint64_t rows() const { return rows_; }
    std::shared_ptr<const FileHandle> file() const { return file_; }

    void write_rows(const void* data, uint64_t rows);  // after the last row; not yet durable
    void truncate(uint64_t rows);
    void sync() const { file_->sync(); }
    // A read-only mapping covering at least `rows` rows (rows <= this->rows()).
    std::shared_ptr<const MappedFile> mapping(uint64_t rows);

private:
    std::string name_;
    std::string path_;
    std::shared_ptr<FileHandle> file_;
    Header header_{};
    uint64_t rows_ = 0;
    uint64_t size_ = 0;  // file size when opened
    bool writable_ = false;
    std::shared_ptr<const MappedFile> mapping_;
};

// The matrices of one store directory, all of one dtype and dim, holding the same number of rows.
class Store {
public:
    static Store create(const std::string& dir, const std::vector<std::string>& names, DType dtype, uint32_t dim);
    // `rows`, `dtype` and `dim` come from the commit record; every matrix must agree with them.
    static Store open(const std::string& dir, const std::vector<std::string>& names, uint64_t rows, DType dtype,
                      uint32_t dim, bool writable);

    // Appends `rows` rows to every matrix (data[i] for matrices()[i]) and fsyncs them all.
    // On failure every matrix is cut back to its previous length before the error propagates.
    void append(const std::vector<const void*>& data, uint64_t rows);
    void truncate(uint64_t rows);

    Matrix& matrix(const std::string& name);
    std::vector<Matrix>& matrices() { return matrices_; }
    uint64_t rows() const { return matrices_.empty() ? 0 : matrices_.front().rows(); }

private:
    std::vector<Matrix> matrices_;
};

// Writes `content` to PATH.tmp, fsyncs it, renames it over PATH and fsyncs the directory.
void replace_file_atomic(const std::string& path, const std::string& content);
// Writes `content` to PATH (replacing it), fsyncs the file and its directory.
void write_file_durable(const std::string& path, const std::string& content);

// Streams rows [start, stop) of some matrices in chunks straight from a private read-only mapping of each
// file. One thread per matrix reads the chunks ahead of the consumer into the page cache with pread(2)
// (kReadAheadBytes ahead, skipping pages already cached), so that a cold read streams at the disk's rate;
// another faults chunk k+1 into the mapping (MADV_POPULATE_READ) while the consumer works on chunk k. The pages
// of chunks the consumer has moved past are dropped from the process with MADV_DONTNEED. Resident memory
// therefore stays at about two chunks whatever the store size, while the consumer reads the page cache
// directly with no copy. Dropped pages stay valid: touching them again re-reads them from the page cache.
class ChunkReader {
public:
    struct Chunk {
        uint64_t start = 0;
        uint64_t stop = 0;
        std::vector<const uint8_t*> data;       // one pointer per matrix, (stop - start) rows each
        std::shared_ptr<const void> keep_alive;  // owns the mappings `data` points into
    };

    ChunkReader(Store& store, const std::vector<std::string>& names, uint64_t start, uint64_t stop,
                uint64_t rows_per_chunk);
    ~ChunkReader();
    ChunkReader(const ChunkReader&) = delete;
    ChunkReader& operator=(const ChunkReader&) = delete;

    // Blocks until the next chunk is resident; false after the last one. Rethrows the read-ahead thread's error.
    bool next(Chunk& chunk);
    void close();  // stops and joins the read-ahead thread

private:
    struct Source {
        std::shared_ptr<const FileHandle> file;
        std::shared_ptr<const MappedFile> mapping;
        uint64_t data_offset;
        uint64_t row_bytes;
    };
    struct State {
        std::mutex mutex;
        std::condition_variable changed;
        uint64_t prefetched = 0;  // chunks [0, prefetched) have been faulted in
        uint64_t taken = 0;       // chunks [0, taken) have been handed to the consumer
        bool stop = false;
        std::exception_ptr error;
    };

    // Cold chunks reach the page cache through pread(2) (the kernel's sequential read path with its read-ahead;
    // faulting cold pages into a mapping is slower), one streaming thread per matrix, up to kReadAheadBytes
    // ahead of the consumer: page cache only, nothing mapped, so resident memory does not grow with it.
    static constexpr uint64_t kReadAheadBytes = 256ull << 20;

    void run();
    void stream(size_t source_index);
    void prefetch(uint64_t chunk_index) const;
    void read_into_cache(const Source& source, uint64_t begin, uint64_t end) const;
    void release(uint64_t chunk_index) const;
    // Byte range [begin, end) of a chunk inside a source's mapping.
    std::pair<uint64_t, uint64_t> byte_range(const Source& source, uint64_t chunk_index) const;

    std::vector<Source> sources_;
    std::shared_ptr<const void> mappings_;
    uint64_t start_;
    uint64_t stop_;
    uint64_t rows_per_chunk_;
    uint64_t chunk_count_;
    State state_;
    uint64_t read_ahead_ = 2;  // chunks the streaming threads read ahead of the consumer
    std::thread thread_;
    std::vector<std::thread> streams_;
};

}  // namespace cfbd
