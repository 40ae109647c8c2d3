// The store's chunk reader: streams row ranges of matrix files with read-ahead (see ChunkReader in store.hpp).
#include "store.hpp"

#include <algorithm>
#include <cerrno>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

namespace cfbd {

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
