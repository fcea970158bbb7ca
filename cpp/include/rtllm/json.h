// A small JSON value: engine config files are JSON and the C++ library reads them without Python.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "rtllm/common.h"

namespace rtllm {

class RTLLM_API Json {
 public:
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };
  using Array = std::vector<Json>;
  // Keys keep their insertion order so that dump() round-trips a file readably.
  using Object = std::vector<std::pair<std::string, Json>>;

  Json();  // null
  Json(bool v);
  Json(double v);
  Json(int64_t v);
  Json(int32_t v) : Json(static_cast<int64_t>(v)) {}
  Json(const char* v);
  Json(std::string v);
  Json(Array v);
  Json(Object v);

  // Throws Error naming the byte offset of the first syntax error.
  static Json parse(const std::string& text);
  // indent < 0: one line; otherwise pretty-printed with that many spaces.
  std::string dump(int indent = -1) const;

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::kNull; }
  bool is_bool() const { return type_ == Type::kBool; }
  bool is_number() const { return type_ == Type::kNumber; }
  bool is_string() const { return type_ == Type::kString; }
  bool is_array() const { return type_ == Type::kArray; }
  bool is_object() const { return type_ == Type::kObject; }

  // Accessors throw Error naming the expected and actual type.
  bool as_bool() const;
  double as_double() const;
  int64_t as_int() const;  // throws if the number is not integral
  const std::string& as_string() const;
  const Array& as_array() const;
  const Object& as_object() const;

  size_t size() const;  // elements of an array or members of an object
  const Json& at(size_t index) const;
  bool contains(const std::string& key) const;
  // Throws Error naming the missing key.
  const Json& at(const std::string& key) const;
  const Json& operator[](const std::string& key) const { return at(key); }
  // Members that may be absent (or null): the fallback is returned then.
  int64_t get_int(const std::string& key, int64_t fallback) const;
  double get_double(const std::string& key, double fallback) const;
  bool get_bool(const std::string& key, bool fallback) const;
  std::string get_string(const std::string& key, const std::string& fallback) const;

  // Builders for objects and arrays.
  void set(const std::string& key, Json value);
  void push_back(Json value);

 private:
  Type type_;
  bool bool_ = false;
  double number_ = 0.0;
  std::string string_;
  std::shared_ptr<Array> array_;
  std::shared_ptr<Object> object_;
};

}  // namespace rtllm
