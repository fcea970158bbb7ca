// Json: a recursive-descent parser (RFC 8259) and a printer that keeps object member order.
#include "rtllm/json.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace rtllm {

namespace {

const char* type_name(Json::Type t) {
  switch (t) {
    case Json::Type::kNull: return "null";
    case Json::Type::kBool: return "bool";
    case Json::Type::kNumber: return "number";
    case Json::Type::kString: return "string";
    case Json::Type::kArray: return "array";
    case Json::Type::kObject: return "object";
  }
  return "?";
}

// Nesting deeper than this is rejected instead of overflowing the stack.
constexpr int kMaxDepth = 512;

class Parser {
 public:
  explicit Parser(const std::string& text) : s_(text) {}

  Json parse_document() {
    Json v = parse_value(0);
    skip_ws();
    if (pos_ != s_.size()) fail("unexpected trailing characters");
    return v;
  }

 private:
  [[noreturn]] void fail(const char* what) {
    throw Error(detail::concat("JSON parse error at byte ", pos_, ": ", what));
  }

  void skip_ws() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r'))
      ++pos_;
  }

  bool consume_literal(const char* lit) {
    size_t n = std::strlen(lit);
    if (s_.compare(pos_, n, lit) != 0) return false;
    pos_ += n;
    return true;
  }

  Json parse_value(int depth) {
    if (depth > kMaxDepth) fail("nesting too deep");
    skip_ws();
    if (pos_ >= s_.size()) fail("unexpected end of input");
    char c = s_[pos_];
    if (c == '{') return parse_object(depth);
    if (c == '[') return parse_array(depth);
    if (c == '"') return Json(parse_string());
    if (c == '-' || (c >= '0' && c <= '9')) return parse_number();
    if (consume_literal("true")) return Json(true);
    if (consume_literal("false")) return Json(false);
    if (consume_literal("null")) return Json();
    fail("unexpected character");
  }

  Json parse_object(int depth) {
    ++pos_;  // '{'
    Json::Object obj;
    skip_ws();
    if (pos_ < s_.size() && s_[pos_] == '}') {
      ++pos_;
      return Json(std::move(obj));
    }
    while (true) {
      skip_ws();
      if (pos_ >= s_.size() || s_[pos_] != '"') fail("expected a string key");
      std::string key = parse_string();
      skip_ws();
      if (pos_ >= s_.size() || s_[pos_] != ':') fail("expected ':'");
      ++pos_;
      obj.emplace_back(std::move(key), parse_value(depth + 1));  // duplicate keys: at() finds the first
      skip_ws();
      if (pos_ >= s_.size()) fail("unexpected end of input in object");
      if (s_[pos_] == ',') { ++pos_; continue; }
      if (s_[pos_] == '}') { ++pos_; return Json(std::move(obj)); }
      fail("expected ',' or '}'");
    }
  }

  Json parse_array(int depth) {
    ++pos_;  // '['
    Json::Array arr;
    skip_ws();
    if (pos_ < s_.size() && s_[pos_] == ']') {
      ++pos_;
      return Json(std::move(arr));
    }
    while (true) {
      arr.push_back(parse_value(depth + 1));
      skip_ws();
      if (pos_ >= s_.size()) fail("unexpected end of input in array");
      if (s_[pos_] == ',') { ++pos_; continue; }
      if (s_[pos_] == ']') { ++pos_; return Json(std::move(arr)); }
      fail("expected ',' or ']'");
    }
  }

  Json parse_number() {
    size_t start = pos_;
    if (s_[pos_] == '-') ++pos_;
    if (pos_ >= s_.size() || !isdigit(s_[pos_])) fail("expected a digit");
    if (s_[pos_] == '0') {
      ++pos_;
    } else {
      while (pos_ < s_.size() && isdigit(s_[pos_])) ++pos_;
    }
    bool integral = true;
    if (pos_ < s_.size() && s_[pos_] == '.') {
      integral = false;
      ++pos_;
      if (pos_ >= s_.size() || !isdigit(s_[pos_])) fail("expected a digit after '.'");
      while (pos_ < s_.size() && isdigit(s_[pos_])) ++pos_;
    }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      integral = false;
      ++pos_;
      if (pos_ < s_.size() && (s_[pos_] == '+' || s_[pos_] == '-')) ++pos_;
      if (pos_ >= s_.size() || !isdigit(s_[pos_])) fail("expected a digit in the exponent");
      while (pos_ < s_.size() && isdigit(s_[pos_])) ++pos_;
    }
    std::string token = s_.substr(start, pos_ - start);
    // Integers that fit int64 are kept exact (token ids, sizes); others go through strtod.
    if (integral && token.size() < 19) return Json(static_cast<int64_t>(std::strtoll(token.c_str(), nullptr, 10)));
    return Json(std::strtod(token.c_str(), nullptr));
  }

  static bool isdigit(char c) { return c >= '0' && c <= '9'; }

  uint32_t parse_hex4() {
    if (pos_ + 4 > s_.size()) fail("truncated \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      char c = s_[pos_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
      else { --pos_; fail("invalid hex digit in \\u escape"); }
    }
    return v;
  }

  static void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  std::string parse_string() {
    ++pos_;  // opening quote
    std::string out;
    while (true) {
      if (pos_ >= s_.size()) fail("unterminated string");
      char c = s_[pos_];
      if (c == '"') { ++pos_; return out; }
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
      if (c != '\\') { out += c; ++pos_; continue; }
      ++pos_;
      if (pos_ >= s_.size()) fail("unterminated escape");
      char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': append_utf8(out, parse_code_point()); break;
        default: --pos_; fail("invalid escape");
      }
    }
  }

  // After "\u": one BMP code point, or a high surrogate followed by "\u" and a low surrogate.
  uint32_t parse_code_point() {
    uint32_t cp = parse_hex4();
    if (cp >= 0xDC00 && cp <= 0xDFFF) fail("unpaired low surrogate");
    if (cp < 0xD800 || cp > 0xDBFF) return cp;
    if (pos_ + 2 > s_.size() || s_[pos_] != '\\' || s_[pos_ + 1] != 'u') fail("unpaired high surrogate");
    pos_ += 2;
    uint32_t lo = parse_hex4();
    if (lo < 0xDC00 || lo > 0xDFFF) fail("high surrogate not followed by a low surrogate");
    return 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
  }

  const std::string& s_;
  size_t pos_ = 0;
};

void dump_string(const std::string& s, std::string& out) {
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);  // UTF-8 passes through unchanged
        }
    }
  }
  out += '"';
}

void dump_number(double v, std::string& out) {
  if (!std::isfinite(v)) {  // JSON has no NaN/Inf
    out += "null";
    return;
  }
  char buf[32];
  if (v == std::floor(v) && std::fabs(v) < 1e15) {
    std::snprintf(buf, sizeof(buf), "%.0f", v);
  } else {
    std::snprintf(buf, sizeof(buf), "%.17g", v);
    // Prefer the shortest representation that round-trips.
    for (int prec = 1; prec < 17; ++prec) {
      char shorter[32];
      std::snprintf(shorter, sizeof(shorter), "%.*g", prec, v);
      if (std::strtod(shorter, nullptr) == v) {
        std::memcpy(buf, shorter, sizeof(shorter));
        break;
      }
    }
  }
  out += buf;
}

void dump_value(const Json& v, int indent, int level, std::string& out) {
  auto newline = [&](int lvl) {
    if (indent < 0) return;
    out += '\n';
    out.append(static_cast<size_t>(indent * lvl), ' ');
  };
  switch (v.type()) {
    case Json::Type::kNull: out += "null"; break;
    case Json::Type::kBool: out += v.as_bool() ? "true" : "false"; break;
    case Json::Type::kNumber: dump_number(v.as_double(), out); break;
    case Json::Type::kString: dump_string(v.as_string(), out); break;
    case Json::Type::kArray: {
      const auto& arr = v.as_array();
      out += '[';
      for (size_t i = 0; i < arr.size(); ++i) {
        if (i) out += ',';
        newline(level + 1);
        dump_value(arr[i], indent, level + 1, out);
      }
      if (!arr.empty()) newline(level);
      out += ']';
      break;
    }
    case Json::Type::kObject: {
      const auto& obj = v.as_object();
      out += '{';
      for (size_t i = 0; i < obj.size(); ++i) {
        if (i) out += ',';
        newline(level + 1);
        dump_string(obj[i].first, out);
        out += indent < 0 ? ":" : ": ";
        dump_value(obj[i].second, indent, level + 1, out);
      }
      if (!obj.empty()) newline(level);
      out += '}';
      break;
    }
  }
}

}  // namespace

Json::Json() : type_(Type::kNull) {}
Json::Json(bool v) : type_(Type::kBool), bool_(v) {}
Json::Json(double v) : type_(Type::kNumber), number_(v) {}
Json::Json(int64_t v) : type_(Type::kNumber), number_(static_cast<double>(v)) {}
Json::Json(const char* v) : type_(Type::kString), string_(v) {}
Json::Json(std::string v) : type_(Type::kString), string_(std::move(v)) {}
Json::Json(Array v) : type_(Type::kArray), array_(std::make_shared<Array>(std::move(v))) {}
Json::Json(Object v) : type_(Type::kObject), object_(std::make_shared<Object>(std::move(v))) {}

Json Json::parse(const std::string& text) { return Parser(text).parse_document(); }

std::string Json::dump(int indent) const {
  std::string out;
  dump_value(*this, indent, 0, out);
  return out;
}

#define RTLLM_JSON_EXPECT(t)                                                                    \
  RTLLM_CHECK(type_ == (t), "JSON value is a ", type_name(type_), ", expected a ", type_name(t))

bool Json::as_bool() const {
  RTLLM_JSON_EXPECT(Type::kBool);
  return bool_;
}
double Json::as_double() const {
  RTLLM_JSON_EXPECT(Type::kNumber);
  return number_;
}
int64_t Json::as_int() const {
  RTLLM_JSON_EXPECT(Type::kNumber);
  RTLLM_CHECK(number_ == std::floor(number_) && std::fabs(number_) < 9.3e18, "JSON number ", number_,
              " is not an integer");
  return static_cast<int64_t>(number_);
}
const std::string& Json::as_string() const {
  RTLLM_JSON_EXPECT(Type::kString);
  return string_;
}
const Json::Array& Json::as_array() const {
  RTLLM_JSON_EXPECT(Type::kArray);
  return *array_;
}
const Json::Object& Json::as_object() const {
  RTLLM_JSON_EXPECT(Type::kObject);
  return *object_;
}

size_t Json::size() const {
  if (type_ == Type::kArray) return array_->size();
  if (type_ == Type::kObject) return object_->size();
  RTLLM_CHECK(false, "size() of a JSON ", type_name(type_));
}

const Json& Json::at(size_t index) const {
  const Array& arr = as_array();
  RTLLM_CHECK(index < arr.size(), "JSON array index ", index, " out of range (size ", arr.size(), ")");
  return arr[index];
}

bool Json::contains(const std::string& key) const {
  if (type_ != Type::kObject) return false;
  for (const auto& kv : *object_)
    if (kv.first == key) return true;
  return false;
}

const Json& Json::at(const std::string& key) const {
  for (const auto& kv : as_object())
    if (kv.first == key) return kv.second;
  RTLLM_CHECK(false, "JSON object has no key \"", key, "\"");
}

int64_t Json::get_int(const std::string& key, int64_t fallback) const {
  if (!contains(key) || at(key).is_null()) return fallback;
  return at(key).as_int();
}
double Json::get_double(const std::string& key, double fallback) const {
  if (!contains(key) || at(key).is_null()) return fallback;
  return at(key).as_double();
}
bool Json::get_bool(const std::string& key, bool fallback) const {
  if (!contains(key) || at(key).is_null()) return fallback;
  return at(key).as_bool();
}
std::string Json::get_string(const std::string& key, const std::string& fallback) const {
  if (!contains(key) || at(key).is_null()) return fallback;
  return at(key).as_string();
}

void Json::set(const std::string& key, Json value) {
  if (type_ == Type::kNull) {
    type_ = Type::kObject;
    object_ = std::make_shared<Object>();
  }
  RTLLM_JSON_EXPECT(Type::kObject);
  // Copy on write: copies of a Json share storage.
  if (object_.use_count() > 1) object_ = std::make_shared<Object>(*object_);
  for (auto& kv : *object_) {
    if (kv.first == key) {
      kv.second = std::move(value);
      return;
    }
  }
  object_->emplace_back(key, std::move(value));
}

void Json::push_back(Json value) {
  if (type_ == Type::kNull) {
    type_ = Type::kArray;
    array_ = std::make_shared<Array>();
  }
  RTLLM_JSON_EXPECT(Type::kArray);
  if (array_.use_count() > 1) array_ = std::make_shared<Array>(*array_);
  array_->push_back(std::move(value));
}

}  // namespace rtllm
