// Move-only RAII owners of a file descriptor and of a read-only memory mapping.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "errors.hpp"

namespace cfbd {

[[noreturn]] inline void throw_errno(const std::string& what, const std::string& path) {
    throw IoError(errno, path, what);
}

class FileHandle {
public:
    FileHandle() = default;
    FileHandle(const std::string& path, int flags, mode_t mode = 0644) : path_(path) {
        do {
            fd_ = ::open(path.c_str(), flags | O_CLOEXEC, mode);
        } while (fd_ < 0 && errno == EINTR);
        if (fd_ < 0) throw_errno("cannot open", path);
    }
    ~FileHandle() { reset(); }
    FileHandle(FileHandle&& other) noexcept : fd_(std::exchange(other.fd_, -1)), path_(std::move(other.path_)) {}
    FileHandle& operator=(FileHandle&& other) noexcept {
        if (this != &other) {
            reset();
            fd_ = std::exchange(other.fd_, -1);
            path_ = std::move(other.path_);
        }
        return *this;
    }
    FileHandle(const FileHandle&) = delete;
    FileHandle& operator=(const FileHandle&) = delete;

    int fd() const { return fd_; }
    const std::string& path() const { return path_; }

    void sync() const {
        if (::fsync(fd_) != 0) throw_errno("fsync failed for", path_);
    }

private:
    void reset() {
        if (fd_ >= 0) ::close(fd_);
        fd_ = -1;
    }
    int fd_ = -1;
    std::string path_;
};

// The first `length` bytes of a file, mapped read-only and shared.
class MappedFile {
public:
    MappedFile() = default;
    MappedFile(const FileHandle& file, size_t length) : length_(length) {
        if (length == 0) return;
        void* addr = ::mmap(nullptr, length, PROT_READ, MAP_SHARED, file.fd(), 0);
        if (addr == MAP_FAILED) throw_errno("cannot mmap", file.path());
        addr_ = addr;
    }
    ~MappedFile() { reset(); }
    MappedFile(MappedFile&& other) noexcept
        : addr_(std::exchange(other.addr_, nullptr)), length_(std::exchange(other.length_, 0)) {}
    MappedFile& operator=(MappedFile&& other) noexcept {
        if (this != &other) {
            reset();
            addr_ = std::exchange(other.addr_, nullptr);
            length_ = std::exchange(other.length_, 0);
        }
        return *this;
    }
    MappedFile(const MappedFile&) = delete;
    MappedFile& operator=(const MappedFile&) = delete;

    const uint8_t* data() const { return static_cast<const uint8_t*>(addr_); }
    size_t size() const { return length_; }

private:
    void reset() {
        if (addr_ != nullptr) ::munmap(addr_, length_);
        addr_ = nullptr;
        length_ = 0;
    }
    void* addr_ = nullptr;
    size_t length_ = 0;
};

}  // namespace cfbd
