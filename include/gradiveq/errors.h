// Error reporting for the whole library.
//
// Two tiers, as in PyTorch: GVQ_CHECK_ARG is for caller mistakes and throws gradiveq::InvalidArgument
// (a std::invalid_argument, so pybind11 turns it into a Python ValueError) whose message names the
// function, the argument and the offending value. GVQ_ASSERT is for internal invariants and throws
// std::logic_error: seeing one is a bug in GradiVeQ, not in the caller.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace gradiveq {

class InvalidArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {
template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}
}  // namespace detail

}  // namespace gradiveq

// GVQ_CHECK_ARG(cond, "where", "argument", message parts...)
// -> "gradiveq.where: argument 'argument' message parts..."
#define GVQ_CHECK_ARG(cond, where, arg, ...)                                           \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      throw ::gradiveq::InvalidArgument(::gradiveq::detail::concat(                   \
          "gradiveq.", where, ": argument '", arg, "' ", __VA_ARGS__));               \
    }                                                                                 \
  } while (false)

#define GVQ_ASSERT(cond, ...)                                                         \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      throw std::logic_error(::gradiveq::detail::concat(                              \
          "gradiveq internal error: ", #cond, " failed at ", __FILE__, ":", __LINE__, \
          " ", ##__VA_ARGS__));                                                       \
    }                                                                                 \
  } while (false)
