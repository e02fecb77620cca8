// The fuzzer's bytes read as a stream of choices, shared by the libFuzzer
// targets: past the end every choice is 0, so any input is a whole case.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>

namespace gmtk_fuzz {

class Choices {
 public:
  Choices(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  uint8_t byte() { return position_ < size_ ? data_[position_++] : 0; }
  uint16_t u16() { return static_cast<uint16_t>(byte() | (byte() << 8)); }
  uint32_t u32() { return u16() | (static_cast<uint32_t>(u16()) << 16); }
  bool flag() { return (byte() & 1u) != 0; }
  size_t below(size_t n) { return n == 0 ? 0 : u16() % n; }
  double number() {  // values on and around every boundary a check has
    static const double kValues[] = {0.0, 0.5,  0.9, 0.99, 1.0,  1e-3, 1e-8, -0.0, -1e-3, 1.0000001, 2.0, 1e300,
                                     -1.0, 0.999, 0.3, 1e-320, std::numeric_limits<double>::infinity(),
                                     -std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN()};
    const uint8_t pick = byte();
    if (pick < sizeof(kValues) / sizeof(kValues[0])) return kValues[pick];
    return static_cast<double>(pick) / 255.0;
  }
  size_t remaining() const { return size_ - position_; }
  int raw_enum() {  // an enum's value, sometimes out of range
    const uint8_t pick = byte();
    return pick < 200 ? pick % 4 : static_cast<int>(static_cast<int8_t>(pick)) * 1000;
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t position_ = 0;
};

}  // namespace gmtk_fuzz
