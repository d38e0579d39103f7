#pragma once

#define GRADIVEQ_VERSION_MAJOR 0
#define GRADIVEQ_VERSION_MINOR 1
#define GRADIVEQ_VERSION_PATCH 0

namespace gradiveq {
constexpr const char* kVersion = "0.1.0";
}  // namespace gradiveq
