#include "gradclient/npy.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "absl/types/span.h"

namespace gradclient {
namespace {

constexpr absl::string_view kMagic("\x93NUMPY", 6);
// numpy.lib.format.ARRAY_ALIGN: the data starts at a multiple of this.
constexpr size_t kArrayAlign = 64;
// numpy.lib.format.GROWTH_AXIS_MAX_DIGITS: numpy leaves room after the header dict so the first
// dimension can grow to this many digits in place.
constexpr size_t kGrowthAxisMaxDigits = 21;
constexpr size_t kMaxVersion1HeaderLength = 0xFFFF;
// Bounds the header parser's recursion so a header of a million '(' cannot exhaust the stack.
// numpy's own headers nest two deep (a tuple inside the dict).
constexpr int kMaxNesting = 32;
// How much of a header, and of one literal in it, an error message quotes.
constexpr size_t kMaxQuotedHeaderBytes = 160;
constexpr size_t kMaxQuotedLiteralBytes = 64;

// Bytes from the file as they appear in an error message: printable ASCII as is, the rest
// escaped, cut after `limit` bytes.
std::string EscapeForMessage(absl::string_view text, size_t limit) {
  std::string escaped;
  for (char c : text.substr(0, limit)) {
    const unsigned char byte = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      absl::StrAppend(&escaped, "\\", std::string(1, c));
    } else if (byte >= 0x20 && byte < 0x7F) {
      escaped.push_back(c);
    } else {
      absl::StrAppend(&escaped, "\\x", absl::Hex(byte, absl::kZeroPad2));
    }
  }
  if (text.size() > limit) absl::StrAppend(&escaped, "... (", text.size(), " bytes)");
  return escaped;
}

std::string QuoteForMessage(absl::string_view text, size_t limit) {
  if (text.size() > limit) {
    return absl::StrCat("\"", EscapeForMessage(text.substr(0, limit), limit), "\"... (",
                        text.size(), " bytes)");
  }
  return absl::StrCat("\"", EscapeForMessage(text, limit), "\"");
}

// A literal's source text for an error message, e.g. descr='<f8'.
std::string LiteralForMessage(absl::string_view source) {
  return EscapeForMessage(source, kMaxQuotedLiteralBytes);
}

// Python's repr() of a tuple of ints: "()", "(3,)", "(2, 3)".
std::string ShapeRepr(absl::Span<const int64_t> shape) {
  if (shape.size() == 1) return absl::StrCat("(", shape[0], ",)");
  return absl::StrCat("(", absl::StrJoin(shape, ", "), ")");
}

// One Python literal from a .npy header: the subset of ast.literal_eval that numpy headers use.
struct PyLiteral {
  enum class Kind { kString, kInt, kBool, kNone, kTuple, kList, kDict };
  Kind kind = Kind::kNone;
  // The literal's own text in the header, quoted in error messages.
  absl::string_view source;
  std::string string_value;
  int64_t int_value = 0;
  // Set for an int outside int64; int_value is then meaningless.
  bool int_overflow = false;
  bool bool_value = false;
  // Tuple and list elements; for a dict, keys and values alternate.
  std::vector<PyLiteral> items;
};

// Recursive-descent parser for PyLiteral. Errors are InvalidArgument with the offset in the
// header; the caller adds the file name.
class LiteralParser {
 public:
  // `allow_long_suffix`: accept Python 2's "3L" integers, which numpy strips from version 1.0
  // and 2.0 headers before evaluating them.
  LiteralParser(absl::string_view text, bool allow_long_suffix)
      : text_(text), allow_long_suffix_(allow_long_suffix) {}

  // Parses `text` as a single literal with optional surrounding whitespace.
  absl::StatusOr<PyLiteral> ParseAll() {
    PyLiteral literal;
    SkipSpace();
    if (absl::Status status = ParseValue(/*depth=*/0, &literal); !status.ok()) return status;
    SkipSpace();
    if (pos_ != text_.size()) return Error("the end of the header after the dict");
    return literal;
  }

 private:
  static bool IsSpace(char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
  }
  static bool IsDigit(char c) { return c >= '0' && c <= '9'; }
  static bool IsIdentifierChar(char c) {
    return IsDigit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
  }

  bool AtEnd() const { return pos_ >= text_.size(); }
  char Peek() const { return AtEnd() ? '\0' : text_[pos_]; }

  void SkipSpace() {
    while (!AtEnd() && IsSpace(text_[pos_])) ++pos_;
  }

  absl::Status Error(absl::string_view expected) const {
    std::string found =
        AtEnd() ? std::string("end of header") : QuoteForMessage(text_.substr(pos_, 1), 1);
    return absl::InvalidArgumentError(
        absl::StrCat("at offset ", pos_, ": expected ", expected, ", found ", found));
  }

  absl::Status ParseValue(int depth, PyLiteral* out) {
    if (depth > kMaxNesting) {
      return absl::InvalidArgumentError(
          absl::StrCat("at offset ", pos_, ": literals nested more than ", kMaxNesting, " deep"));
    }
    const size_t start = pos_;
    absl::Status status;
    const char c = Peek();
    if (c == '\'' || c == '"') {
      status = ParseString(out);
    } else if (IsDigit(c) || c == '-' || c == '+') {
      status = ParseInt(out);
    } else if (c == '(') {
      status = ParseTuple(depth, out);
    } else if (c == '[') {
      status = ParseList(depth, out);
    } else if (c == '{') {
      status = ParseDict(depth, out);
    } else if (IsIdentifierChar(c)) {
      status = ParseKeyword(out);
    } else {
      return Error("a literal");
    }
    if (!status.ok()) return status;
    // A parenthesized non-tuple keeps the source of what it wraps; everything else spans the
    // text consumed here.
    if (out->source.empty()) out->source = text_.substr(start, pos_ - start);
    return absl::OkStatus();
  }

  absl::Status ParseString(PyLiteral* out) {
    const char quote = text_[pos_++];
    out->kind = PyLiteral::Kind::kString;
    while (true) {
      if (AtEnd() || Peek() == '\n') return Error(absl::StrCat("closing ", std::string(1, quote)));
      const char c = text_[pos_++];
      if (c == quote) return absl::OkStatus();
      if (c != '\\') {
        out->string_value.push_back(c);
        continue;
      }
      if (AtEnd()) return Error("an escaped character");
      const char escaped = text_[pos_++];
      switch (escaped) {
        case '\\':
        case '\'':
        case '"':
          out->string_value.push_back(escaped);
          break;
        case 'n':
          out->string_value.push_back('\n');
          break;
        case 't':
          out->string_value.push_back('\t');
          break;
        case 'r':
          out->string_value.push_back('\r');
          break;
        default:
          // Python keeps unrecognized escapes as written.
          out->string_value.push_back('\\');
          out->string_value.push_back(escaped);
      }
    }
  }

  absl::Status ParseInt(PyLiteral* out) {
    out->kind = PyLiteral::Kind::kInt;
    bool negative = false;
    if (Peek() == '-' || Peek() == '+') {
      negative = Peek() == '-';
      ++pos_;
      SkipSpace();
    }
    if (!IsDigit(Peek())) return Error("a digit");
    uint64_t magnitude = 0;
    bool overflow = false;
    while (IsDigit(Peek())) {
      const uint64_t digit = static_cast<uint64_t>(text_[pos_++] - '0');
      if (magnitude > (std::numeric_limits<uint64_t>::max() - digit) / 10) {
        overflow = true;
      } else {
        magnitude = magnitude * 10 + digit;
      }
    }
    if (allow_long_suffix_ && (Peek() == 'L' || Peek() == 'l')) ++pos_;
    if (IsIdentifierChar(Peek()) || Peek() == '.') {
      return Error("an integer (floats, complex and non-decimal numbers are not supported)");
    }
    constexpr uint64_t kMaxPositive = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
    if (overflow || magnitude > kMaxPositive + (negative ? 1 : 0)) {
      out->int_overflow = true;
    } else if (negative) {
      // Two's complement negation through unsigned arithmetic handles -2^63.
      out->int_value = static_cast<int64_t>(~magnitude + 1);
    } else {
      out->int_value = static_cast<int64_t>(magnitude);
    }
    return absl::OkStatus();
  }

  absl::Status ParseKeyword(PyLiteral* out) {
    const size_t start = pos_;
    while (IsIdentifierChar(Peek())) ++pos_;
    const absl::string_view word = text_.substr(start, pos_ - start);
    if (word == "True" || word == "False") {
      out->kind = PyLiteral::Kind::kBool;
      out->bool_value = word == "True";
    } else if (word == "None") {
      out->kind = PyLiteral::Kind::kNone;
    } else {
      pos_ = start;
      return Error("a literal (only True, False and None are allowed as names)");
    }
    return absl::OkStatus();
  }

  // "()" and "(x,)" and "(x, y, ...)" are tuples; "(x)" is just x.
  absl::Status ParseTuple(int depth, PyLiteral* out) {
    ++pos_;  // '('
    SkipSpace();
    out->kind = PyLiteral::Kind::kTuple;
    if (Peek() == ')') {
      ++pos_;
      return absl::OkStatus();
    }
    PyLiteral first;
    if (absl::Status status = ParseValue(depth + 1, &first); !status.ok()) return status;
    SkipSpace();
    if (Peek() == ')') {
      ++pos_;
      *out = std::move(first);
      return absl::OkStatus();
    }
    out->items.push_back(std::move(first));
    return ParseSequenceTail(')', depth, out);
  }

  absl::Status ParseList(int depth, PyLiteral* out) {
    ++pos_;  // '['
    SkipSpace();
    out->kind = PyLiteral::Kind::kList;
    if (Peek() == ']') {
      ++pos_;
      return absl::OkStatus();
    }
    PyLiteral first;
    if (absl::Status status = ParseValue(depth + 1, &first); !status.ok()) return status;
    out->items.push_back(std::move(first));
    SkipSpace();
    if (Peek() == ']') {
      ++pos_;
      return absl::OkStatus();
    }
    return ParseSequenceTail(']', depth, out);
  }

  // After the first element, at a ',': parses [',' element]* [','] close.
  absl::Status ParseSequenceTail(char close, int depth, PyLiteral* out) {
    while (true) {
      if (Peek() != ',') return Error(absl::StrCat("',' or '", std::string(1, close), "'"));
      ++pos_;
      SkipSpace();
      if (Peek() == close) {
        ++pos_;
        return absl::OkStatus();
      }
      PyLiteral item;
      if (absl::Status status = ParseValue(depth + 1, &item); !status.ok()) return status;
      out->items.push_back(std::move(item));
      SkipSpace();
      if (Peek() == close) {
        ++pos_;
        return absl::OkStatus();
      }
    }
  }

  absl::Status ParseDict(int depth, PyLiteral* out) {
    ++pos_;  // '{'
    out->kind = PyLiteral::Kind::kDict;
    while (true) {
      SkipSpace();
      if (Peek() == '}') {
        ++pos_;
        return absl::OkStatus();
      }
      if (AtEnd()) return Error("a key or '}' in the dict");
      PyLiteral key;
      if (absl::Status status = ParseValue(depth + 1, &key); !status.ok()) return status;
      SkipSpace();
      if (Peek() != ':') return Error("':' after a dict key");
      ++pos_;
      SkipSpace();
      PyLiteral value;
      if (absl::Status status = ParseValue(depth + 1, &value); !status.ok()) return status;
      out->items.push_back(std::move(key));
      out->items.push_back(std::move(value));
      SkipSpace();
      if (Peek() == ',') {
        ++pos_;
      } else if (Peek() != '}') {
        return Error("',' or '}' in the dict");
      }
    }
  }

  absl::string_view text_;
  bool allow_long_suffix_;
  size_t pos_ = 0;
};

uint64_t LoadLittleEndian(absl::string_view bytes, size_t offset, size_t width) {
  uint64_t value = 0;
  for (size_t i = 0; i < width; ++i) {
    value |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[offset + i])) << (8 * i);
  }
  return value;
}

uint64_t LoadBigEndian(absl::string_view bytes, size_t offset, size_t width) {
  uint64_t value = 0;
  for (size_t i = 0; i < width; ++i) {
    value = (value << 8) | static_cast<unsigned char>(bytes[offset + i]);
  }
  return value;
}

void AppendLittleEndian(uint64_t value, size_t width, std::string* out) {
  for (size_t i = 0; i < width; ++i) out->push_back(static_cast<char>((value >> (8 * i)) & 0xFF));
}

// A family of dtypes one reader accepts: numpy's kind character and the element widths, the
// first of which is what the reader returns and needs no conversion.
struct NpyFamily {
  char kind;         // 'f' or 'i', as in '<f4'
  const char* name;  // "float" / "int", for messages
  std::vector<size_t> widths;
  const char* accepted;  // the accepted descrs, for messages
};
const NpyFamily& FloatFamily() {
  static const auto* family =
      new NpyFamily{'f',
                    "float",
                    {4, 8, 2},
                    "float32, float64 or float16 in either byte order ('<f4', '<f8', '<f2', "
                    "'>f4', '>f8', '>f2')"};
  return *family;
}
const NpyFamily& IntFamily() {
  static const auto* family = new NpyFamily{
      'i', "int", {8, 4}, "int64 or int32 in either byte order ('<i8', '<i4', '>i8', '>i4')"};
  return *family;
}

// The validated header fields.
struct NpyHeader {
  std::vector<int64_t> shape;
  int64_t element_count = 0;
  std::string descr;  // as written, e.g. "<f8"
  size_t width = 0;   // bytes per element
  bool big_endian = false;
};

// "float64", "int32": numpy's name of a dtype of `family` with elements of `width` bytes.
std::string TypeName(const NpyFamily& family, size_t width) {
  return absl::StrCat(family.name, 8 * width);
}

// Checks the dict against what numpy writes for a C-order array of a dtype of `family`.
absl::StatusOr<NpyHeader> InterpretHeader(const PyLiteral& dict, absl::string_view name,
                                          absl::string_view header_text, const NpyFamily& family) {
  const std::string quoted_header =
      QuoteForMessage(absl::StripTrailingAsciiWhitespace(header_text), kMaxQuotedHeaderBytes);
  if (dict.kind != PyLiteral::Kind::kDict) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ": malformed .npy header: expected a dict literal, got ", quoted_header));
  }
  const PyLiteral* descr = nullptr;
  const PyLiteral* fortran_order = nullptr;
  const PyLiteral* shape = nullptr;
  std::vector<std::string> keys;
  bool keys_ok = true;
  for (size_t i = 0; i + 1 < dict.items.size(); i += 2) {
    const PyLiteral& key = dict.items[i];
    keys.push_back(LiteralForMessage(key.source));
    const PyLiteral** slot = nullptr;
    if (key.kind == PyLiteral::Kind::kString) {
      if (key.string_value == "descr") slot = &descr;
      if (key.string_value == "fortran_order") slot = &fortran_order;
      if (key.string_value == "shape") slot = &shape;
    }
    // Unknown and repeated keys both make the key set wrong.
    if (slot == nullptr || *slot != nullptr) {
      keys_ok = false;
    } else {
      *slot = &dict.items[i + 1];
    }
  }
  if (!keys_ok || descr == nullptr || fortran_order == nullptr || shape == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": malformed .npy header: keys are {", absl::StrJoin(keys, ", "),
                     "}, expected exactly 'descr', 'fortran_order' and 'shape'"));
  }

  if (descr->kind != PyLiteral::Kind::kString) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": unsupported dtype: descr=", LiteralForMessage(descr->source),
                     " (structured dtypes are not supported; expected ", family.accepted, ")"));
  }
  // A descr is a byte order ('<' little, '>' big, '=' native, '|' not applicable), the kind and
  // the width in bytes. numpy writes '<' or '>'; '=' and '|' mean the host's order, which this
  // reader takes as little-endian, as numpy itself does on every little-endian host.
  const std::string& dtype = descr->string_value;
  size_t width = 0;
  if (dtype.size() == 3 &&
      (dtype[0] == '<' || dtype[0] == '>' || dtype[0] == '=' || dtype[0] == '|') &&
      dtype[1] == family.kind) {
    for (size_t candidate : family.widths) {
      if (dtype[2] == static_cast<char>('0' + candidate)) width = candidate;
    }
  }
  if (width == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": unsupported dtype: descr=", LiteralForMessage(descr->source),
                     "; expected ", family.accepted));
  }

  if (fortran_order->kind != PyLiteral::Kind::kBool) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ": malformed .npy header: fortran_order=", LiteralForMessage(fortran_order->source),
        " is not True or False"));
  }
  if (fortran_order->bool_value) {
    return absl::InvalidArgumentError(
        absl::StrCat(name,
                     ": fortran_order=True is not supported; save the array in C order "
                     "(numpy.ascontiguousarray)"));
  }

  if (shape->kind != PyLiteral::Kind::kTuple) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": malformed .npy header: shape=", LiteralForMessage(shape->source),
                     " is not a tuple of ints"));
  }
  NpyHeader result;
  bool has_zero = false;
  for (size_t i = 0; i < shape->items.size(); ++i) {
    const PyLiteral& dim = shape->items[i];
    if (dim.kind != PyLiteral::Kind::kInt) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": malformed .npy header: shape[", i,
                                                     "]=", LiteralForMessage(dim.source),
                                                     " is not an int"));
    }
    if (dim.int_overflow) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, ": shape=", LiteralForMessage(shape->source), ": shape[", i,
                       "]=", LiteralForMessage(dim.source), " overflows int64"));
    }
    if (dim.int_value < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, ": shape=", LiteralForMessage(shape->source), ": shape[", i,
                       "]=", dim.int_value, " is negative"));
    }
    has_zero = has_zero || dim.int_value == 0;
    result.shape.push_back(dim.int_value);
  }
  // With a zero dimension the product is 0 even if a partial product of the others would
  // overflow.
  int64_t count = 1;
  if (has_zero) {
    count = 0;
  } else {
    for (int64_t dim : result.shape) {
      if (count > std::numeric_limits<int64_t>::max() / dim) {
        return absl::InvalidArgumentError(absl::StrCat(name,
                                                       ": shape=", LiteralForMessage(shape->source),
                                                       ": the number of elements overflows int64"));
      }
      count *= dim;
    }
  }
  result.element_count = count;
  result.descr = dtype;
  result.width = width;
  result.big_endian = dtype[0] == '>';
  return result;
}

// A parsed file: its header, and the bytes of its data, exactly element_count elements of
// the header's dtype.
struct NpyContents {
  NpyHeader header;
  absl::string_view data;
};

absl::StatusOr<NpyContents> ParseNpyContents(absl::string_view bytes, absl::string_view name,
                                             const NpyFamily& family) {
  if (!absl::StartsWith(bytes, kMagic)) {
    if (absl::StartsWith(kMagic, bytes)) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": truncated .npy file: ", bytes.size(),
                                                     " bytes, shorter than the magic string"));
    }
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": not a .npy file: bad magic ",
                     QuoteForMessage(bytes.substr(0, kMagic.size()), kMagic.size()),
                     ", expected \"\\x93NUMPY\""));
  }
  size_t pos = kMagic.size();
  if (bytes.size() < pos + 2) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": truncated .npy file: ends before the format version"));
  }
  const int major = static_cast<unsigned char>(bytes[pos]);
  const int minor = static_cast<unsigned char>(bytes[pos + 1]);
  pos += 2;
  if (minor != 0 || major < 1 || major > 3) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: unsupported .npy format version %d.%d (supported: 1.0, 2.0, 3.0)",
                        name, major, minor));
  }
  const size_t length_width = major == 1 ? 2 : 4;
  if (bytes.size() < pos + length_width) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": truncated .npy file: ends before the header length"));
  }
  const uint64_t header_length = LoadLittleEndian(bytes, pos, length_width);
  pos += length_width;
  if (header_length > bytes.size() - pos) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": truncated .npy file: header length ", header_length, " at offset ",
                     pos, " runs past the end of the file (", bytes.size(), " bytes)"));
  }
  const absl::string_view header_text = bytes.substr(pos, header_length);
  pos += header_length;

  LiteralParser parser(header_text, /*allow_long_suffix=*/major <= 2);
  absl::StatusOr<PyLiteral> literal = parser.ParseAll();
  if (!literal.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        name, ": malformed .npy header: ", literal.status().message(), "; header: ",
        QuoteForMessage(absl::StripTrailingAsciiWhitespace(header_text), kMaxQuotedHeaderBytes)));
  }
  absl::StatusOr<NpyHeader> header = InterpretHeader(*literal, name, header_text, family);
  if (!header.ok()) return header.status();

  const absl::string_view data_bytes = bytes.substr(pos);
  const uint64_t count = static_cast<uint64_t>(header->element_count);
  const size_t width = header->width;
  const std::string type_name = TypeName(family, width);
  if (count > data_bytes.size() / width) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": truncated .npy file: shape ", ShapeRepr(header->shape), " needs ",
                     count, " ", type_name, " values but only ", data_bytes.size(), " bytes (",
                     data_bytes.size() / width, " values) follow the header"));
  }
  if (data_bytes.size() != count * width) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": ", data_bytes.size() - count * width,
                     " extra bytes after the data: shape ", ShapeRepr(header->shape), " needs ",
                     count * width, " bytes but ", data_bytes.size(), " follow the header"));
  }
  return NpyContents{*std::move(header), data_bytes};
}

// The complete bytes of the file at `path`; errors as ReadNpyFile documents.
absl::StatusOr<std::string> ReadFileBytes(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat(path, ": cannot open for reading"));
  std::string bytes;
  absl::Status status;
  struct stat info;
  if (fstat(fd, &info) != 0) {
    status = absl::ErrnoToStatus(errno, absl::StrCat(path, ": cannot stat"));
  } else if (S_ISDIR(info.st_mode)) {
    status = absl::ErrnoToStatus(EISDIR, absl::StrCat(path, ": cannot read a .npy file"));
  } else {
    if (S_ISREG(info.st_mode) && info.st_size > 0) bytes.reserve(info.st_size);
    char buffer[1 << 16];
    while (true) {
      const ssize_t n = read(fd, buffer, sizeof(buffer));
      if (n == 0) break;
      if (n < 0) {
        if (errno == EINTR) continue;
        status = absl::ErrnoToStatus(errno, absl::StrCat(path, ": read failed"));
        break;
      }
      bytes.append(buffer, static_cast<size_t>(n));
    }
  }
  close(fd);
  if (!status.ok()) return status;
  return bytes;
}

}  // namespace

float Float16ToFloat32(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits >> 15) << 31;
  const uint32_t exponent = (bits >> 10) & 0x1F;
  uint32_t mantissa = bits & 0x3FF;
  uint32_t result;
  if (exponent == 0x1F) {
    // Infinity, or NaN with its payload kept in the top mantissa bits (quiet stays quiet).
    result = sign | 0x7F800000u | (mantissa << 13);
  } else if (exponent != 0) {
    // Normal: rebias the exponent from 15 to 127.
    result = sign | ((exponent - 15 + 127) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    result = sign;  // +-0
  } else {
    // Subnormal, mantissa * 2^-24: shift the leading 1 into the implicit bit; every half
    // subnormal is a normal float32.
    int shift = 0;
    while ((mantissa & 0x400) == 0) {
      mantissa <<= 1;
      ++shift;
    }
    result = sign | (static_cast<uint32_t>(127 - 14 - shift) << 23) | ((mantissa & 0x3FF) << 13);
  }
  float value;
  std::memcpy(&value, &result, sizeof(value));
  return value;
}

float Float64ToFloat32(double value) {
  constexpr double kMaxFloat = std::numeric_limits<float>::max();
  // A finite double outside float's range cannot go through static_cast (undefined
  // behaviour); round-to-nearest-even takes magnitudes from FLT_MAX + half its ulp (2^103) up
  // to infinity and leaves the ones below at FLT_MAX.
  if (std::isfinite(value) && std::abs(value) > kMaxFloat) {
    const float magnitude = std::abs(value) >= kMaxFloat + 0x1p103
                                ? std::numeric_limits<float>::infinity()
                                : std::numeric_limits<float>::max();
    return std::signbit(value) ? -magnitude : magnitude;
  }
  return static_cast<float>(value);
}

absl::StatusOr<NpyArray> ParseNpy(absl::string_view bytes, absl::string_view name) {
  absl::StatusOr<NpyContents> contents = ParseNpyContents(bytes, name, FloatFamily());
  if (!contents.ok()) return contents.status();
  const NpyHeader& header = contents->header;
  const uint64_t count = static_cast<uint64_t>(header.element_count);
  const absl::string_view data = contents->data;
  const size_t width = header.width;
  auto load = header.big_endian ? LoadBigEndian : LoadLittleEndian;
  NpyArray array;
  array.data.resize(count);
  if (width == 4) {
    for (uint64_t i = 0; i < count; ++i) {
      const uint32_t bits = static_cast<uint32_t>(load(data, 4 * i, 4));
      std::memcpy(&array.data[i], &bits, sizeof(float));
    }
  } else if (width == 8) {
    for (uint64_t i = 0; i < count; ++i) {
      const uint64_t bits = load(data, 8 * i, 8);
      double value;
      std::memcpy(&value, &bits, sizeof(value));
      array.data[i] = Float64ToFloat32(value);
    }
  } else {
    for (uint64_t i = 0; i < count; ++i) {
      array.data[i] = Float16ToFloat32(static_cast<uint16_t>(load(data, 2 * i, 2)));
    }
  }
  if (width != 4 || header.big_endian) array.converted_from = header.descr;
  array.shape = std::move(contents->header.shape);
  return array;
}

absl::StatusOr<NpyInt64Array> ParseNpyInt64(absl::string_view bytes, absl::string_view name) {
  absl::StatusOr<NpyContents> contents = ParseNpyContents(bytes, name, IntFamily());
  if (!contents.ok()) return contents.status();
  const NpyHeader& header = contents->header;
  const uint64_t count = static_cast<uint64_t>(header.element_count);
  const size_t width = header.width;
  auto load = header.big_endian ? LoadBigEndian : LoadLittleEndian;
  NpyInt64Array array;
  array.data.resize(count);
  for (uint64_t i = 0; i < count; ++i) {
    const uint64_t bits = load(contents->data, width * i, width);
    // int32 is sign-extended: every int32 is an int64.
    array.data[i] =
        width == 8 ? static_cast<int64_t>(bits) : static_cast<int64_t>(static_cast<int32_t>(bits));
  }
  if (width != 8 || header.big_endian) array.converted_from = header.descr;
  array.shape = std::move(contents->header.shape);
  return array;
}

std::string SerializeNpy(absl::Span<const int64_t> shape, absl::Span<const float> data) {
  // Mirrors numpy.lib.format._write_array_header: sorted keys, repr() values, a trailing ", ",
  // then room for the first dimension to grow.
  std::string dict =
      absl::StrCat("{'descr': '<f4', 'fortran_order': False, 'shape': ", ShapeRepr(shape), ", }");
  if (!shape.empty()) {
    const size_t first_dim_digits = absl::StrCat(shape[0]).size();
    if (first_dim_digits < kGrowthAxisMaxDigits) {
      dict.append(kGrowthAxisMaxDigits - first_dim_digits, ' ');
    }
  }
  // _wrap_header: pad with spaces and a final '\n' so the data starts at a multiple of 64.
  // When the unpadded header is already aligned numpy still adds a full 64 bytes.
  const size_t unpadded_length = dict.size() + 1;
  size_t length_width = 2;
  size_t pad = kArrayAlign - (kMagic.size() + 2 + length_width + unpadded_length) % kArrayAlign;
  int major = 1;
  if (unpadded_length + pad > kMaxVersion1HeaderLength) {
    major = 2;
    length_width = 4;
    pad = kArrayAlign - (kMagic.size() + 2 + length_width + unpadded_length) % kArrayAlign;
  }

  std::string out;
  out.reserve(kMagic.size() + 2 + length_width + unpadded_length + pad +
              data.size() * sizeof(float));
  out.append(kMagic.data(), kMagic.size());
  out.push_back(static_cast<char>(major));
  out.push_back('\0');
  AppendLittleEndian(unpadded_length + pad, length_width, &out);
  out.append(dict);
  out.append(pad, ' ');
  out.push_back('\n');
  for (float value : data) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    AppendLittleEndian(bits, sizeof(bits), &out);
  }
  return out;
}

absl::StatusOr<NpyArray> ReadNpyFile(const std::string& path) {
  absl::StatusOr<std::string> bytes = ReadFileBytes(path);
  if (!bytes.ok()) return bytes.status();
  return ParseNpy(*bytes, path);
}

absl::StatusOr<NpyInt64Array> ReadNpyInt64File(const std::string& path) {
  absl::StatusOr<std::string> bytes = ReadFileBytes(path);
  if (!bytes.ok()) return bytes.status();
  return ParseNpyInt64(*bytes, path);
}

absl::Status WriteNpyFile(const std::string& path, absl::Span<const int64_t> shape,
                          absl::Span<const float> data) {
  bool has_zero = false;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 0) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": cannot write shape ",
                                                     ShapeRepr(shape), ": shape[", i,
                                                     "]=", shape[i], " is negative"));
    }
    has_zero = has_zero || shape[i] == 0;
  }
  uint64_t count = has_zero ? 0 : 1;
  for (size_t i = 0; i < shape.size() && count != 0; ++i) {
    const uint64_t dim = static_cast<uint64_t>(shape[i]);
    if (count > std::numeric_limits<uint64_t>::max() / dim) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": cannot write shape ", ShapeRepr(shape), ": the number of elements overflows"));
    }
    count *= dim;
  }
  if (count != data.size()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": cannot write shape ", ShapeRepr(shape),
                                                   " with ", data.size(),
                                                   " values: the shape needs ", count));
  }
  const std::string bytes = SerializeNpy(shape, data);
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat(path, ": cannot open for writing"));
  absl::Status status;
  size_t written = 0;
  while (written < bytes.size()) {
    const ssize_t n = write(fd, bytes.data() + written, bytes.size() - written);
    if (n < 0) {
      if (errno == EINTR) continue;
      status = absl::ErrnoToStatus(errno, absl::StrCat(path, ": write failed"));
      break;
    }
    written += static_cast<size_t>(n);
  }
  if (close(fd) != 0 && status.ok()) {
    status = absl::ErrnoToStatus(errno, absl::StrCat(path, ": close failed"));
  }
  return status;
}

}  // namespace gradclient
