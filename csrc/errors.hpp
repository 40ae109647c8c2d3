// The two kinds of failure the core reports; bindings.cpp maps them to StoreFormatError and OSError.
#pragma once

#include <cstring>
#include <stdexcept>
#include <string>

namespace cfbd {

// The bytes on disk are not a valid store of a format this build reads. The message names the file.
struct FormatError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// A system call failed: `action` ("cannot open") on `path`, with errno `code`.
struct IoError : std::runtime_error {
    IoError(int code, std::string path, std::string action)
        : std::runtime_error(action + " " + path + ": " + std::strerror(code)),
          code(code),
          path(std::move(path)),
          action(std::move(action)) {}
    int code;
    std::string path;
    std::string action;
};

}  // namespace cfbd
