// Store format v1: the fixed 64-byte header at the start of every matrix file (see docs/store-format.md).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the cfbd store format is little-endian; this build targets a big-endian machine"
#endif

namespace cfbd {

constexpr char kMagic[8] = {'C', 'F', 'B', 'D', 'E', 'M', 'B', '\0'};
constexpr uint32_t kFormatVersion = 1;
constexpr uint64_t kDataAlignment = 4096;      // data offset is a multiple of this
constexpr uint32_t kMaxDim = 1u << 20;         // sanity bound when validating headers
constexpr size_t kMaxNameBytes = 23;           // matrix name, NUL-terminated in Header::name

enum class DType : uint32_t { float16 = 1, bfloat16 = 2, float32 = 3 };

inline bool dtype_is_known(uint32_t code) { return code >= 1 && code <= 3; }

inline size_t dtype_size(DType dtype) { return dtype == DType::float32 ? 4 : 2; }

inline const char* dtype_name(DType dtype) {
    switch (dtype) {
        case DType::float16: return "float16";
        case DType::bfloat16: return "bfloat16";
        case DType::float32: return "float32";
    }
    return "unknown";
}

#pragma pack(push, 1)
struct Header {
    char magic[8];            // kMagic
    uint32_t format_version;  // kFormatVersion
    uint32_t dtype;           // DType code
    uint32_t dim;             // values per row
    uint32_t header_size;     // sizeof(Header)
    uint64_t data_offset;     // first row starts here; multiple of kDataAlignment
    char name[24];            // matrix name ("image", "text"), NUL-padded
    uint32_t reserved;        // zero
    uint32_t checksum;        // CRC-32 (zlib's) of the 60 bytes before it
};
#pragma pack(pop)
static_assert(sizeof(Header) == 64, "the v1 header is exactly 64 bytes");
static_assert(offsetof(Header, checksum) == 60, "checksum is the last field");

// CRC-32 with the IEEE polynomial, identical to zlib.crc32.
inline uint32_t crc32(const void* data, size_t length) {
    static const auto table = [] {
        struct Table { uint32_t v[256]; } t{};
        for (uint32_t i = 0; i < 256; ++i) {
            uint32_t c = i;
            for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            t.v[i] = c;
        }
        return t;
    }();
    uint32_t crc = 0xFFFFFFFFu;
    const auto* bytes = static_cast<const uint8_t*>(data);
    for (size_t i = 0; i < length; ++i) crc = table.v[(crc ^ bytes[i]) & 0xFFu] ^ (crc >> 8);
    return crc ^ 0xFFFFFFFFu;
}

inline uint32_t header_checksum(const Header& header) { return crc32(&header, offsetof(Header, checksum)); }

inline Header make_header(DType dtype, uint32_t dim, const std::string& name) {
    Header header{};
    std::memcpy(header.magic, kMagic, sizeof(kMagic));
    header.format_version = kFormatVersion;
    header.dtype = static_cast<uint32_t>(dtype);
    header.dim = dim;
    header.header_size = sizeof(Header);
    header.data_offset = kDataAlignment;
    std::memcpy(header.name, name.data(), name.size() < kMaxNameBytes ? name.size() : kMaxNameBytes);
    header.checksum = header_checksum(header);
    return header;
}

}  // namespace cfbd
